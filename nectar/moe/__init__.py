"""The Mixture-of-Experts layer: router interface and static routers, experts, dispatch, the layer,
and the balancing losses used when training it. Nothing here adapts at test time (see nectar.control)."""
