"""Run a function on several gloo ranks (CPU processes) and collect what each returns."""
import datetime
import multiprocessing
import os
import queue as queue_module
import socket
import time


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(target, rank, world, port, args, queue, collected):
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        queue.put((rank, target(rank, *args)))
        # Tensors cross the queue as file descriptors this process hands out when the parent
        # unpickles them: exiting before then fails the parent's get (FileNotFoundError, seen in
        # CI once). Stay until the parent has every result.
        collected.wait(timeout=120)
    finally:
        dist.destroy_process_group()


def run_ranks(target, world, *args, timeout=120):
    """[target(rank, *args) for each rank], run in `world` spawned processes joined by gloo.
    target must be a module-level function (spawn pickles it)."""
    ctx = multiprocessing.get_context("spawn")
    queue, collected = ctx.Queue(), ctx.Event()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(target, r, world, port, args, queue, collected))
             for r in range(world)]
    for p in procs:
        p.start()
    results = {}
    try:
        deadline = time.monotonic() + timeout
        while len(results) < world and time.monotonic() < deadline:
            try:
                rank, result = queue.get(timeout=1)
                results[rank] = result
            except queue_module.Empty:  # a rank that died never answers: stop waiting
                if any(p.exitcode not in (None, 0) for p in procs):
                    break
    finally:
        collected.set()
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert len(results) == world and all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return [results[r] for r in range(world)]
