"""The callback long steps report progress through: (what is happening, steps done, steps in all).

Library code only calls it; the CLI draws it as a progress bar (`slmflow.cli.progress_bar`).
"""

from collections.abc import Callable

Progress = Callable[[str, int, int], None]
