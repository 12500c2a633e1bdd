"""`scopegate serve --workers N`: uvicorn's supervisor, each worker on a listening socket of its own.

uvicorn's `Multiprocess` hands every worker the same listening socket, and whichever worker wakes
first accepts every connection waiting: a load generator (or a proxy in front) that opens its
kept-alive connections at once can land them all on one worker. Measured with bench/ on the
2-core machine at c=50, two workers then served 0.97x what one did, their CPU split unevenly.
Here the parent binds one socket per worker to the same port with SO_REUSEPORT, so the kernel
spreads new connections over the workers by hash; worker `i` (and any replacement of it) accepts
only on socket `i`. The parent keeps every socket open, so a restarting worker's connections wait
in its socket's backlog instead of being refused.
"""

from __future__ import annotations

import socket

from uvicorn.config import STARTUP_FAILURE, Config
from uvicorn.supervisors.multiprocess import Multiprocess, Process, logger


class WorkerSockets(Multiprocess):
    def __init__(self, config: Config, sockets: list[socket.socket]) -> None:
        super().__init__(config, sockets=sockets)
        if len(sockets) != self.processes_num:
            raise ValueError(f"{self.processes_num} workers need as many sockets, not {len(sockets)}")

    def _spawn(self, index: int) -> Process:
        process = Process(self.config, [self.sockets[index]])
        process.start()
        return process

    def init_processes(self) -> None:
        self.processes = [self._spawn(index) for index in range(self.processes_num)]

    def restart_all(self) -> None:
        """Each worker replaced by one on the same socket, in service before the old one retires."""
        for index, old in enumerate(self.processes):
            if self.should_exit.is_set():
                return
            new = self._spawn(index)
            if not new.wait_until_ready(self.config.timeout_worker_healthcheck, self.should_exit):
                new.kill()
                new.join()
                if not self.should_exit.is_set():
                    logger.error(f"New child process [{new.pid}] was not ready in time; keeping worker "
                                 f"[{old.pid}] and aborting the restart.")
                return
            old.terminate()
            old.join()
            self.processes[index] = new

    def keep_subprocess_alive(self) -> None:
        if self.should_exit.is_set():
            return
        for index, process in enumerate(self.processes):
            if process.is_alive(timeout=self.config.timeout_worker_healthcheck):
                continue
            process.kill()  # hung: kill it
            process.join()
            if process.exitcode == STARTUP_FAILURE:
                # It failed before serving: the app or its configuration would fail the same way again.
                logger.error(f"Child process [{process.pid}] failed to start, stopping the parent process.")
                self.should_exit.set()
                return
            if self.should_exit.is_set():
                return
            logger.info(f"Child process [{process.pid}] died")
            self.processes[index] = self._spawn(index)
