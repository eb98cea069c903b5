"""``python -m agent.demo.llama ARGS``: llama-cpp-python's OpenAI-compatible server, made safe here.

The same server and arguments as ``python -m llama_cpp.server``, with one change: llama.cpp's
extra CPU weight buffers (runtime repacking, AMX) are switched off. On these machines (Xeon with
AMX, llama-cpp-python 0.3.36 built from source) any prompt of two or more tokens crashes
``llama_decode`` with a segmentation fault when they are on; single-token decoding works, and so
does everything with them off. For a 135M-parameter model they buy nothing noticeable.
``Llama`` does not expose the switch (``use_extra_bufts``), so the default model parameters are
wrapped before the server loads its model.
"""

from __future__ import annotations

import sys


def disable_extra_buffer_types() -> None:
    """Make every ``Llama`` created from now on load its weights without extra buffer types."""
    import llama_cpp.llama_cpp as lib

    defaults = lib.llama_model_default_params
    if getattr(defaults, "_annie_no_extra_bufts", False):
        return
    if "use_extra_bufts" not in (name for name, *_ in lib.llama_model_params._fields_):
        print("demo_llama: this llama-cpp-python has no use_extra_bufts switch; running as it is", file=sys.stderr)
        return

    def model_params():
        params = defaults()
        params.use_extra_bufts = False
        return params

    model_params._annie_no_extra_bufts = True  # type: ignore[attr-defined]
    lib.llama_model_default_params = model_params


def main(argv: list[str] | None = None) -> None:
    disable_extra_buffer_types()
    from llama_cpp.server.__main__ import main as serve

    sys.argv = ["llama_cpp.server", *(sys.argv[1:] if argv is None else argv)]
    serve()


if __name__ == "__main__":
    main()
