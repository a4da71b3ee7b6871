"""One persistent-cache entry per computation, whatever CPU device it runs on: for the test session's process
(tests/conftest.py) and every Python process it starts (tests/children/sitecustomize.py)."""


def key_without_device_assignment(cache_key) -> None:
  """Keys the persistent cache as JAX keys it on GPU: without the device assignment. A test process has 8 emulated
  CPU devices and each learner's step runs on its own, so the same computation compiled once per device, about
  three quarters of the in-process tests' time; and a child process (launch/train.py, an mpiexec rank, a Ray
  actor, a grid's cell) runs its learners on other devices than the test process did. XLA CPU code does not depend
  on the device it runs on: loading it for another device gives the same results on that device. ``cache_key`` is
  JAX's private ``jax._src.cache_key``: where its shape differs from this JAX's, nothing is changed (and only the
  time is lost)."""
  import inspect
  hash_options = getattr(cache_key, "_hash_serialized_compile_options", None)
  if (hash_options is None or getattr(hash_options, "without_device_assignment", False)
      or "strip_device_assignment" not in inspect.signature(hash_options).parameters):
    return

  def without_device_assignment(hash_obj, compile_options_obj, strip_device_assignment=False):
    del strip_device_assignment
    return hash_options(hash_obj, compile_options_obj, strip_device_assignment=True)

  without_device_assignment.without_device_assignment = True    # once: the hook and tests/conftest.py both call this
  cache_key._hash_serialized_compile_options = without_device_assignment
