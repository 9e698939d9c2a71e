"""Convert a GGUF file into a normal float32 safetensors checkpoint with its tokenizer.

Run as a child process (`python -m perta_stream.models.gguf_convert GGUF OUT PARENT_PID`) by models/fetch.py:
transformers must start with HF_HUB_OFFLINE=1 set (otherwise the GGUF path looks for kernels on
the Hub), and the dequantized model's memory goes back when the child exits.
"""

from __future__ import annotations

import sys
from pathlib import Path


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize `gguf_path` to float32 and save model, config, generation config and tokenizer in `out_dir`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True))
    # The weights are plain float32 now; save_pretrained refuses a model that still carries its
    # quantizer, and a checkpoint that names one would be loaded through it again.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def die_with_parent(parent_pid: int) -> None:
    """End this process as soon as the fetch that started it ends, however it ends (SIGKILL
    included): a conversion nobody waits for only holds gigabytes of memory.

    Linux delivers SIGKILL on the parent's death (prctl PR_SET_PDEATHSIG); elsewhere a thread
    watches for the process being handed to another parent. Either way a parent that died before
    this call is noticed at once.
    """
    import os

    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    else:
        import threading
        import time

        def watch() -> None:
            while os.getppid() == parent_pid:
                time.sleep(1.0)
            os._exit(1)

        threading.Thread(target=watch, daemon=True, name="perta-parent-watch").start()
    if os.getppid() != parent_pid:
        os._exit(1)


_PR_SET_PDEATHSIG = 1


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: python -m perta_stream.models.gguf_convert GGUF_FILE OUT_DIR PARENT_PID", file=sys.stderr)
        return 2
    die_with_parent(int(argv[2]))
    convert_gguf(Path(argv[0]), Path(argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
