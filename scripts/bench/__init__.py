"""Timing scripts: qtool's CUDA kernels (``bench_kernels``), rotate + GPTQ wall time (``bench_quantize``),
streamed vs in-memory memory (``stream_memory``), qtool beside llm-compressor (``vs_llmcompressor``, needs
``make peer-venv``) and a py-spy profile of a GPTQ run (``profile_gptq``)."""
