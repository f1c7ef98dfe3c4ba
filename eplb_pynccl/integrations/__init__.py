"""Layer 6: eplb_pynccl inside inference engines.

Each submodule adapts the public API of the layers below to one engine and imports that engine
only when one of its functions is called, so the package never depends on an engine:

* :mod:`eplb_pynccl.integrations.vllm`: vLLM's EPLB communicator, policy and layer loop
  (tested against vLLM 0.33.0; ``make test-vllm``).
* :mod:`eplb_pynccl.integrations.sglang`: SGLang's EPLB weight update and policy
  (SGLang 0.5.23; ``make test-sglang``).

Nothing below this layer imports it.
"""

__all__: list[str] = []
