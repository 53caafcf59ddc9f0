"""The quick GPU pass: every number one 15-minute GPU slot can give, in one command that always returns some.

    python -m benchmarks.gpu_quick OUTDIR [--budget-s 540] [--steps env,ceilings,...] [--suite quick|compile]
                                          [--dry-run] [--build-extension]

Steps of the quick suite, in order, each in its own process under its own time cap (a crashed CUDA context or
a hung kernel costs one step, not the pass):

  env       GPU name, SM count, clocks, driver, CUDA, torch, Triton, commit, whether the extension is built
  ceilings  a 4 GiB device-to-device copy (GB/s, read + write) and an 8192³ bf16 matmul (TFLOP/s)
  check     correctness without the interpreter, outputs poisoned, vs float32 references on the GPU: attention
            forward and backward at the SDXL shapes and the odd ones, GroupNorm+SiLU, fourier_embedding;
            each row says which backend and which path (TMA or pointers) served it
  kernels   do_bench timings: attention ours vs SDPA (default, flash, cuDNN, efficient), GroupNorm+SiLU ours
            vs eager (GB/s, % of copy), fourier vs eager; no torch.compile
  sweep     every declared candidate tile config (sdxl_kernels.configs) timed at the SDXL shapes; the best per
            shape class written to OUTDIR/configs-sm<arch>.json, the format the launchers read
  model     SDXL base UNet (random weights) at 1024², batch 2, bf16: eager vs ours vs ours + CUDA graphs,
            it/s, peak memory, the top 15 kernels by GPU time for ours

`--build-extension` first rebuilds the C++/CUDA extension (a step of its own; the pass never needs it).
`--suite compile` (a second command): torch.compile of the eager and the kernels-on UNet, the training step
(ours vs eager vs compile) and the two-stage 1024² loop, the pytest benchmarks streaming their rows.

Every row is appended (and flushed) to OUTDIR/results.jsonl the moment it is measured, so a kill at any point
keeps everything measured so far; a step's start and end are rows too. SIGTERM (or the budget running out)
stops the running step, and the pass still writes OUTDIR/summary.md (printed last) and the charts. The exit
status is a bit mask of the failed steps (bit i = the i-th step of the suite; 0: every step ok).

`--dry-run` runs the same code on a CPU machine: Triton in the interpreter, tiny shapes, few candidates, short
timers. Its figures mean nothing and its rows carry device_type "cpu"; it exists so that the first GPU run
cannot die of a typo (tests/test_gpu_quick.py runs it).
"""
