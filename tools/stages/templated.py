"""The shared parts of stages that ask the teacher: sampling parameters and prompt templates.

Prompt templates are data files in `tools/templates/`; each stage takes `*_file` parameters to
use other files. They are rendered with `render_template` over the record plus the stage's own
names (`{question}`, `{answer}`, `{critique}`, `{code}`, `{tests}`, `{error}`, ...); their
sha256 goes into provenance (`template_sha256`, and per template in `templates`), into the
stage fingerprint and into the teacher cache key (`template_version`).

An answer the teacher cut off (finish_reason "length" or "content_filter") is retried and, if it
stays cut off, fails the seed; a stage with `allow_truncated: true` accepts such answers.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from phijax.config import positive, ranged
from phijax.hashing import canonical_json, sha256_hex
from tools.pipeline.stage import (Stage, StageConfig, StageContext, child_record, opt_in,
                                  render_template)

TEMPLATES = Path(__file__).resolve().parents[1] / "templates"


@dataclass(kw_only=True)
class SamplingConfig(StageConfig):
    """How the teacher samples: chat-completion parameters."""
    temperature: float = ranged(1.0, ge=0)
    max_tokens: Optional[int] = positive(None)
    seed: Optional[int] = None
    params: dict = field(default_factory=dict)   # more parameters, e.g. {top_p: 0.95}
    allow_truncated: bool = opt_in()   # accept answers cut off at max_tokens or by a filter


async def sample(ctx: StageContext, cfg: SamplingConfig, messages: list[dict], version: str,
                 n: int = 1) -> list[str]:
    """The teacher's n replies to `messages`; `version` (a template hash) is in the cache key."""
    accept = {"allow_truncated": True} if cfg.allow_truncated else {}
    return await ctx.teacher.chat(messages, n=n, temperature=cfg.temperature,
                                  max_tokens=cfg.max_tokens, seed=cfg.seed,
                                  template_version=version, **accept, **cfg.params)


class TemplatedStage(Stage):
    """A stage whose prompts are template files. `TEMPLATE_FILES` maps each template's name to
    (the config field naming another file, the default file in tools/templates); `VIEWS` maps
    it to the names the stage adds to the record when it renders it."""
    TEMPLATE_FILES: dict[str, tuple[str, str]] = {}
    VIEWS: dict[str, tuple[str, ...]] = {}

    def __init__(self, cfg: SamplingConfig, key: str):
        super().__init__(cfg, key)
        self.templates = {name: Path(getattr(cfg, param) or TEMPLATES / default).read_text()
                          for name, (param, default) in self.template_files().items()}
        self.template_shas = {name: sha256_hex(t) for name, t in self.templates.items()}
        self.template_sha256 = sha256_hex(canonical_json(self.templates))
        self.hashes["template_sha256"] = self.template_sha256

    def template_files(self) -> dict[str, tuple[str, str]]:
        return self.TEMPLATE_FILES

    def prompt_templates(self) -> list[tuple[str, str, tuple[str, ...]]]:
        return [(f"{param}: {getattr(self.cfg, param) or TEMPLATES / default}",
                 self.templates[name], self.VIEWS.get(name, ()))
                for name, (param, default) in self.template_files().items()]

    async def ask(self, ctx: StageContext, template: str, view: dict, n: int = 1) -> list[str]:
        """The teacher's replies to template `template` rendered over `view`."""
        prompt = render_template(self.templates[template], view)
        return await sample(ctx, self.cfg, [{"role": "user", "content": prompt}],
                            self.template_shas[template][:16], n)

    async def ask_parsed(self, ctx: StageContext, template: str, view: dict,
                         parse: Callable[[str], Any], dropped: str) -> tuple[str, Any]:
        """The teacher's reply and what `parse` makes of it; a None parse is counted in
        `stats[dropped]` (the record then gives no output)."""
        (reply,) = await self.ask(ctx, template, view)
        parsed = parse(reply)
        if parsed is None:
            self.stats[dropped] += 1
        return reply, parsed

    def output(self, record: dict, ctx: StageContext, choice: int = 0, **prov) -> dict:
        """The child record, its provenance naming the templates and the teacher model."""
        prov = {"templates": dict(self.template_shas), **prov}
        return child_record(record, self, choice, template_sha256=self.template_sha256,
                            model=ctx.model, **prov)
