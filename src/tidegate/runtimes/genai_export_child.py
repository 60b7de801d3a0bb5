"""The exporter's child process: ``python -m tidegate.runtimes.genai_export_child SRC OUT``.

Run by :mod:`tidegate.runtimes.genai_export` with the exporter directory first on
``PYTHONPATH``, so the transformers imported here is the one optimum-intel supports. Exit status
0 when ``OUT`` holds the model, its tokenizer and detokenizer; the last stderr lines say why not.
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    source, output = argv
    from optimum.exporters.openvino import main_export
    from optimum.intel import OVConfig

    # fp32 weights: bf16 is a compile-time choice, and fp32 must stay exact. Passing the dtype
    # also stops optimum-intel's default int8 compression of models above 1B parameters.
    main_export(source, Path(output), task="text-generation-with-past", local_files_only=True,
                ov_config=OVConfig(dtype="fp32"), convert_tokenizer=True, stateful=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
