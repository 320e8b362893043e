"""`duoserve plan`: size a deployment for an SLO from a profile of one worker.

Modules, one idea each: step_model (step time from a step's shape, and its fit), profile (measuring a
worker on the engine's real paths; the profile file), trace (a served engine's steps, `--step-trace`,
and the step model fitted from them), workload (bench's workloads and traces), deployment
(colocated:N | disagg:PxD), objectives (--slo), simulate (the discrete-event simulation running the
engine's scheduler and the router's policy on a virtual clock), recommend (the cheapest deployment
meeting an SLO), serve (desired replicas from observed traffic, for an autoscaler), cli.
"""
