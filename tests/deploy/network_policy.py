"""NetworkPolicy semantics (networking.k8s.io/v1), enough to ask "may pod A open port P on pod B?".

A connection needs both sides: an egress rule of some policy selecting the source (or none selecting it
for egress), and an ingress rule of some policy selecting the destination (or none for ingress). Named
ports resolve on the destination pod's containers. Peers: `podSelector` alone means pods of the
policy's namespace, `namespaceSelector` alone every pod of the matching namespaces, both together their
intersection; no `from`/`to` means everyone, no `ports` every port. ipBlocks are not used by duoserve's
policies and are not modelled (a destination that is no pod only matches rules without `to`).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Endpoint:
    labels: dict[str, str]
    namespace: str = "duoserve"
    namespace_labels: dict[str, str] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)  # the pod's named container ports
    is_pod: bool = True  # False: the API server, the internet


def selects(selector: dict | None, labels: dict[str, str]) -> bool:
    """A LabelSelector (matchLabels and matchExpressions) against labels; {} selects everything."""
    if selector is None:
        return True
    if any(labels.get(key) != value for key, value in (selector.get("matchLabels") or {}).items()):
        return False
    for expression in selector.get("matchExpressions") or []:
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and key in labels and labels[key] in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
    return True


def _peer_matches(peer: dict, policy_namespace: str, other: Endpoint) -> bool:
    if "ipBlock" in peer:
        raise NotImplementedError("ipBlock peers are not modelled")
    if not other.is_pod:
        return False
    if "namespaceSelector" in peer:
        namespace_labels = {"kubernetes.io/metadata.name": other.namespace, **other.namespace_labels}
        if not selects(peer["namespaceSelector"], namespace_labels):
            return False
    elif other.namespace != policy_namespace:
        return False
    return "podSelector" not in peer or selects(peer["podSelector"], other.labels)


def _port_matches(ports: list[dict] | None, destination: Endpoint, port: int) -> bool:
    if not ports:
        return True
    for entry in ports:
        if entry.get("protocol", "TCP") != "TCP":
            continue
        if "port" not in entry:
            return True
        wanted = entry["port"]
        if isinstance(wanted, str):
            wanted = destination.ports.get(wanted)  # a named port: the destination's container port
        if wanted is not None and wanted <= port <= entry.get("endPort", wanted):
            return True
    return False


def _allowed_one_way(
    policies: list[dict], direction: str, subject: Endpoint, other: Endpoint, port: int, destination: Endpoint
) -> bool:
    """Whether the policies of `subject` (the source for Egress, the destination for Ingress) admit it."""
    peers_key = "from" if direction == "Ingress" else "to"
    rules_key = direction.lower()
    applicable = [
        p
        for p in policies
        if subject.is_pod
        and p["metadata"].get("namespace", "duoserve") == subject.namespace
        and direction in p["spec"].get("policyTypes", ["Ingress"])
        and selects(p["spec"]["podSelector"], subject.labels)
    ]
    if not applicable:
        return True  # no policy isolates this pod in this direction
    for policy in applicable:
        namespace = policy["metadata"].get("namespace", "duoserve")
        for rule in policy["spec"].get(rules_key) or []:
            peers = rule.get(peers_key)
            if peers and not any(_peer_matches(peer, namespace, other) for peer in peers):
                continue
            if _port_matches(rule.get("ports"), destination, port):
                return True
    return False


def ingress_allows(policies: list[dict], source: Endpoint, destination: Endpoint, port: int) -> bool:
    """Whether the destination's side admits the connection (whatever the source's egress says)."""
    return _allowed_one_way(policies, "Ingress", destination, source, port, destination)


def egress_allows(policies: list[dict], source: Endpoint, destination: Endpoint, port: int) -> bool:
    """Whether the source's side lets the connection out (whatever the destination's ingress says)."""
    return _allowed_one_way(policies, "Egress", source, destination, port, destination)


def allowed(policies: list[dict], source: Endpoint, destination: Endpoint, port: int) -> bool:
    """May `source` open a TCP connection to `destination`'s `port`? Both sides must agree."""
    return egress_allows(policies, source, destination, port) and ingress_allows(
        policies, source, destination, port
    )
