"""`python -m orchestrator` and the `pipe` script.

Start-up is most of what a no-op `pipe run` costs (bench/), so the entry point keeps two costs off it: the cyclic
garbage collector runs no passes while the libraries import (hundreds of thousands of objects that live as long as
the process), which are then frozen out of later passes; and cli.main leaves without the interpreter's teardown.
"""

import gc


def main() -> None:
    gc.disable()
    from orchestrator import cli

    gc.freeze()
    gc.enable()
    cli.main()


if __name__ == "__main__":
    main()
