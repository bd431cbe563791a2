"""Timing scripts: qtool's CUDA kernels (``bench_kernels``) and rotate + GPTQ wall time (``bench_quantize``)."""
