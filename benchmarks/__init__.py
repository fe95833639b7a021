"""vipo's benchmarks, installed as `vipo.benchmarks` (setup.py PARTS): the kernel, step and loader
benchmark scripts, the GPU check, and the `vipo bench` commands (cli.py, found through the
`vipo.commands` entry point). They use the engine; the engine never imports them.

Each script also runs as `python benchmarks/NAME.py` from a checkout with vipo installed (or on
PYTHONPATH, as gpu_check.py arranges), importing its neighbours as `vipo.benchmarks.*`.
"""
