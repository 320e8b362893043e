"""The router (`duoserve router`, `duoserve up`): an engine client over remote workers, its routing
policies and the discovery sources that find them."""
