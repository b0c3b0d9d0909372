"""Rollouts from a phijax Sampler, judged by the question's oracle: the estimator PTS runs on."""
from __future__ import annotations

from phijax.errors import ConfigError
from phijax.eval.questions import answer_text, check, prompt_ids, question_error
from phijax.sampling import Request, check_request
from tools.pts.pairs import pts
from tools.pts.search import Job, Prefix, PTSConfig, Rollouts, Stats


class SamplerEstimator:
    """`Estimate` over a `phijax.sampling.Sampler`: rollouts continue prompt + prefix at the
    config's temperature until a stop token or the answer's max_new_tokens; each answer
    (prefix + continuation, stop token dropped) is decoded and judged by `phijax.eval.questions.check`
    (judgements cached by text)."""

    def __init__(self, sampler, tokenizer, questions: list[dict], prompts: list[list[int]],
                 cfg: PTSConfig):
        self.sampler, self.tokenizer, self.cfg = sampler, tokenizer, cfg
        self.questions, self.prompts = questions, prompts
        self.stop_ids = tokenizer.stop_ids
        self.judged: dict[tuple[int, str], bool] = {}

    def finished(self, prefix: Prefix) -> bool:
        return len(prefix) >= self.cfg.max_new_tokens or \
            bool(prefix and prefix[-1] in self.stop_ids)

    def judge(self, q: int, answer: list[int]) -> bool:
        text = answer_text(answer, self.tokenizer)
        if (q, text) not in self.judged:
            self.judged[q, text] = check(self.questions[q], text)
        return self.judged[q, text]

    def __call__(self, jobs: list[Job]) -> list[Rollouts]:
        live = [j for j in jobs if not self.finished(j.prefix)]
        samples = dict(zip(live, self.sampler.generate([Request(
            self.prompts[j.question] + list(j.prefix), n=j.n,
            max_new_tokens=self.cfg.max_new_tokens - len(j.prefix),
            temperature=self.cfg.temperature, stop_ids=self.stop_ids, seed=j.seed)
            for j in live]))) if live else {}
        out = []
        for j in jobs:
            if j not in samples:  # a finished answer: nothing to sample
                ok = self.judge(j.question, list(j.prefix))
                out.append(Rollouts([ok] * j.n, [[] for _ in range(j.n)], [[] for _ in range(j.n)]))
                continue
            got = samples[j]
            out.append(Rollouts([self.judge(j.question, list(j.prefix) + s.tokens) for s in got],
                                [s.tokens for s in got], [s.logprobs for s in got]))
        return out


def check_prompts(prompts: list[list[int]], labels: list[str], max_len: int, vocab_size: int,
                  cfg: PTSConfig) -> None:
    """ConfigError naming the first question whose prompt the model cannot continue."""
    for ids, label in zip(prompts, labels):
        error = check_request(Request(ids, max_new_tokens=cfg.max_new_tokens), max_len,
                              vocab_size)
        if error:
            raise ConfigError(f"{label}: {error}")


def run_pts(sampler, tokenizer, questions: list[dict], cfg: PTSConfig,
            log=None) -> tuple[list[dict], Stats]:
    """PTS pairs for question records (`phijax.eval.questions`) with a Sampler and its
    Tokenizer. Every record, prompt and setting is checked before anything is sampled."""
    labels = [f"question {q.get('id') if isinstance(q, dict) else i}"
              for i, q in enumerate(questions)]
    for q, label in zip(questions, labels):
        error = question_error(q)
        if error:
            raise ConfigError(f"{label}: {error}")
    prompts = [prompt_ids(q, tokenizer) for q in questions]
    check_prompts(prompts, labels, sampler.max_len, sampler.cfg.vocab_size, cfg)
    estimate = SamplerEstimator(sampler, tokenizer, questions, prompts, cfg)
    return pts([(q["id"], p) for q, p in zip(questions, prompts)], estimate, cfg, log)


