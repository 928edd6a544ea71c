"""What the tests (and the benchmark, ``bench/``) share, one idea a module:

- ``ports``:     ``free_port``, a loopback port for a server about to start;
- ``digests``:   ``sha256_digest``, the OCI digest of some bytes;
- ``processes``: ``Service``, a server process a test owns (log file, readiness probe, stop by
  its own handle), and ``Distribution``, the reference registry as the real upstream;
- ``mirror``:    the mirror's one command line (``proxy_command``, ``serve_command``),
  ``Mirror`` (the mirror as a process), ``MirrorProcesses`` (several, stopped together), and
  ``StartMirror``, the type of the fixture that starts it in-process;
- ``threads``:   ``LoopThread``, servers on an event loop in a thread of their own;
- ``images``:    real images built in memory (``build_image``, ``build_index``);
- ``push``:      pushing them over the distribution API;
- ``skopeo``:    pulling with skopeo, in an environment where nothing leaves the machine;
- ``verify``:    checking that what a client pulled hashes to its names.
- ``filesystems``: ``tmpfs``, a real small (or read-only) filesystem for disk-full tests.

The in-process fake registry is ``tests/fakeupstream.py``; the fixtures are in the conftest
files, ``tests/conftest.py`` for every test.
"""
