"""Tools that run beside embedq, never inside a worker: the demo, the benchmark engine and
the worker-process helper they (and the tests) share."""
