#!/usr/bin/env python3
"""netns-relay.py NETNS ADDR PORT TARGET_HOST TARGET_PORT: listen on ADDR:PORT inside network namespace NETNS and
relay every connection to TARGET_HOST:TARGET_PORT in this process's own namespace (the host's loopback).

How the cluster fixture lets the nodes reach the host's S3 server (scripts/s3.sh, radosgw on 127.0.0.1) without
giving the host namespace an address or a route: a socket keeps the namespace it was made in, so the listening
socket is made after setns(2) into NETNS and the outgoing ones after setns back. Bytes are passed unchanged, so a
request signed for http://ADDR:PORT is checked by the server against that Host header. Python 3.11 has no
os.setns: libc's setns through ctypes.
"""

from __future__ import annotations

import ctypes
import os
import socket
import sys
import threading

CLONE_NEWNET = 0x40000000


def setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "setns failed")


def pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(1 << 16):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def main() -> None:
    netns, addr, port, target_host, target_port = sys.argv[1:6]
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    inner = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    setns(inner)
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((addr, int(port)))
    server.listen(128)
    setns(home)  # every later socket (the outgoing ones) is made in the host's namespace
    while True:
        client, _ = server.accept()
        try:
            upstream = socket.create_connection((target_host, int(target_port)), timeout=10)
        except OSError:
            client.close()
            continue
        upstream.settimeout(None)
        threading.Thread(target=pump, args=(client, upstream), daemon=True).start()
        threading.Thread(target=pump, args=(upstream, client), daemon=True).start()


if __name__ == "__main__":
    main()
