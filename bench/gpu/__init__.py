"""The CUDA path proven and measured in one short run; ``bench/gpu.sh`` is the way to start it
(it runs ``python -m bench.gpu``; each section is a module of this package).

    bench/gpu.sh                 # on a GPU machine, at most 8 minutes; files under $OUT or bench/results/gpu/
    bench/gpu.sh --dry           # every section on the CPU with tiny sizes, to keep this script working
    python -m bench.gpu --only exactness,generator   # some sections (names below)

Sections, in this order, each timed and guarded (a failing section records its error in the JSON and
the next one runs; a section that would overrun the time budget is skipped and says so):

``env``        torch, CUDA, cuDNN, torchvision, triton, Pillow, OpenCV, the GPU codec's status,
               ``nvidia-smi``.
``exactness``  the generator on the device against CPU float32 (oneDNN) on real photo content, at
               720×960 and 288×288: share of identical bytes and largest difference in float32
               (and in float32 with TF32 allowed, what PyTorch does by default), mean and largest in
               float16 and bfloat16; the device resizes against OpenCV and turns against Pillow; the
               whole pipeline on the device in float32 against the CPU's, on a one-face photo.
``generator``  passes/s at 720×960 and 288×288, batch 1, 8 and 32, float32/16, bfloat16; eager,
               channels-last, ``cudnn.benchmark``; peak memory.
``graphs``     the same with the whole generator captured as a CUDA graph per shape.
``pipeline``   the whole pipeline per photo (stage breakdown) for the 1024×768 one-face photo and
               the four-face composite, per dtype; and photos/s for the worker's batch of eight.
``codec``      nvJPEG (torchvision) against Pillow: decode to the processing size and encode,
               time and difference; which sample files each path takes.
``http``       ``toonserve serve`` on the device with TOONSERVE_DTYPE=auto, 32 clients posting the
               one-face JPEG for JPEG back: photos/s, p50/p99, statuses, the Server-Timing medians,
               GPU utilisation and memory while loaded, and responses against an in-process run.
``video``      a 1280×720 clip (48 frames at 25 fps, bench/steady.py's panning portrait with noise,
               written losslessly) through the clip flow (``serving/clips.py``) on the device at the
               service's dtype (``auto``: float16), steadied and frame by frame: frames/s against the
               target, the per-step ms its report gives, the models alone on the frames in memory;
               and whether PyAV's FFmpeg decodes and encodes H.264 on the GPU (``h264_cuvid``,
               ``h264_nvenc``: listed, and tried in a child process; not required).
``tensorrt``   where the ``tensorrt`` wheels import (optional, not a dependency): the background
               generator exported to ONNX (the ``onnx`` extra) built as a float16 engine with one
               dynamic-shape profile (256×256 to 1088×1920), the filter pinned to float32 and then
               not, run at 720×960 and 288×288, batch 1: deviation from torch float32 on the device
               (mean, max, share within one level), passes/s beside torch's eager float16, build
               time. Without the wheels: "skipped: pip install tensorrt …", not a failure.
``compile``    ``torch.compile`` (reduce-overhead; max-autotune-no-cudagraphs) at fixed shapes, in a
               child process given what is left of the budget: compile time apart, passes/s, bytes
               against eager. Last, because compiling is slow and optional.

Targets are printed next to the figures, never asserted: ≥ 1,000 background passes/s at 720×960 in
half precision with batching, ≥ 300 photos/s end to end through HTTP with JPEG output, and ≥ 60
frames/s for one 720p stream through the clip flow.

``--dry`` runs every section on the CPU (the device runs the ``eager`` backend CUDA uses, against
the CPU's ``onednn``), with 64×64/32×32 images, batches of 1–2, a handful of requests, a stand-in
for CUDA graphs, dynamo without Inductor for ``compile``, and the codec through a Pillow stand-in for
torchvision (``devkit/pillow_tvio.py``), a 128×96 clip of 6 frames for ``video``, and for
``tensorrt`` the export of the tiny generator and a check of the float-output fallback graph, then
the skip (TensorRT builds for a GPU). Its figures only show the script works.

Exit status: 0; 1 if a section failed, including a claim it checks that does not hold (float32 on
the device within a level of the CPU's, the device's resizes giving OpenCV's bytes and turns
Pillow's, every HTTP answer like the in-process run of the same upload, at least one request
served); 3 if CUDA was wanted and is not there. The JSON says which, with tracebacks.
"""
