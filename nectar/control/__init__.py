"""Test-time adaptation: the energy-aware router and its fast-weight network, the controller that steps
them once per chunk, the online energy cost model, the convex chunk problem's bias optimiser and the quality guard."""
