"""``BACKENDS``: the one vocabulary of an op's ``backend`` argument (and of the config fields that choose it,
``foresight.backend`` and ``train.ce_backend``).

* ``"fused"``: the op's ``mirai._C`` kernel (CUDA, or its C++ twin on the CPU); an error when it cannot run;
* ``"reference"``: the plain PyTorch path;
* ``"auto"``: the kernel where it has passed its self-check on the device, else the PyTorch path (each op's
  docstring says where it prefers which).
"""
BACKENDS = ("auto", "fused", "reference")
