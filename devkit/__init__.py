"""Development-only helpers, imported by ``tests/`` and ``bench/``, never by the service.

- :mod:`devkit.reference_graphs`: reference DCT-Net generator graphs built with TensorFlow, and a
  protobuf-only writer of graphs with the same weights for tests that convert but never run them;
- :mod:`devkit.photos`: real photos shipped in scikit-image and matplotlib;
- :mod:`devkit.upstream`: ModelScope's compound flow run with its own code and the TF graphs;
- :mod:`devkit.pillow_tvio`: a Pillow stand-in for ``torchvision.io``'s JPEG calls (the GPU codec's
  plumbing, run on the CPU).

The package is not part of the wheel (pyproject's ``packages.find`` lists service, api and inference
only); TensorFlow, scikit-image, matplotlib and OpenCV come from the ``dev`` extra.
"""
