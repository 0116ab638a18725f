"""The model-free half of the serving workload (issue 27): load traces that say when requests arrive
and how long their prompts and outputs are (`traces`), a continuous-batching scheduler that decides
which request prefills or decodes in which KV-cache slot at every step (`scheduler`), and the
serving figures a run reports from its steps and requests — steady-state J per generated token,
J per request, TTFT/TPOT percentiles, tokens/s (`metrics`). Time is always the backend's clock in
seconds, advanced by the experiment loop; nothing here reads a clock or touches a model."""
