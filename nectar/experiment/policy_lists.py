"""The frontier's policy lists, as plain names: the static frontier (every policy that does not adapt)
and the adaptive policies run against it (the PI share baseline and NECTAR).

Plain strings and nothing imported, so that the command line can show them in `--help` without
importing torch (`nectar.experiment.policies` parses them; tests/cli/test_help.py checks that every
name parses and that the static ones do not adapt).
"""

STATIC_FRONTIER = ["static-top1", "static-top2", "static-top3", "static-cheap",
                   "fixed-bias:0.5", "fixed-bias:1", "fixed-bias:2", "fixed-bias:3", "fixed-bias:5",
                   "fixed-price:0.5", "fixed-price:1", "fixed-price:2", "fixed-price:4",
                   "top-p:0.5", "top-p:0.7", "top-p:0.9", "mix:0.25", "mix:0.5", "mix:0.75"]
ADAPTIVE = ["pi-share:0.5", "nectar"]
