"""Generation backends behind one small interface: token ids in, generated token ids out.

    backend.generate(prompts_ids, params, seeds, max_new_tokens) -> [Generated(token_ids, finish, text)]

- `prompts_ids`: one list of token ids per active trajectory (the `ChatRenderer.generation_context`).
- `seeds`: one integer per row. Each row samples from its own seeded random stream, so a
  trajectory depends on its own seed only — not on which other rows share its batch. That makes
  runs repeatable, resumable and shardable with identical results (CPU; GPUs add their own
  non-determinism).
- `max_new_tokens`: one budget per row (the rollout shrinks it near the total-length limit).
- `Generated.finish`: "eos" (the last token is an end token), "stop" (a stop string was produced;
  everything generated is kept, the rollout cuts the text) or "length" (the budget ran out).

`HFBackend` wraps `model.generate` (CPU or GPU; left-padded batches; `stop_strings`). `VLLMBackend`
wraps vLLM's offline `LLM` (prefix caching, tensor / data parallel), imported only when used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol, Sequence

FINISH = ("eos", "stop", "length")


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ("```output",)

    def __post_init__(self):
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {self.temperature}, {self.top_p}")
        self.temperature, self.top_p, self.stop = float(self.temperature), float(self.top_p), tuple(self.stop)


@dataclass
class Generated:
    token_ids: list[int]  # everything generated, including a final end token or the stop string's tokens
    finish: str  # eos | stop | length
    text: str = ""  # decoded token_ids (convenience; the rollout decodes with its own tokenizer)
    meta: dict = field(default_factory=dict)


class Backend(Protocol):
    def generate(self, prompts_ids: list[list[int]], params: SamplingParams, seeds: Sequence[int],
                 max_new_tokens: Sequence[int]) -> list[Generated]: ...


def end_token_ids(tokenizer, end_texts: Sequence[str] = (), model=None) -> list[int]:
    """Token ids that end a turn: the model's generation eos ids, the tokenizer's eos, and each
    end-of-turn text of the template that is a single token (`<|im_end|>`, `<end_of_turn>`)."""
    ids: list[int] = []
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (gen_eos if isinstance(gen_eos, list) else [gen_eos]) + [tokenizer.eos_token_id]:
        if value is not None and value not in ids:
            ids.append(int(value))
    for text in end_texts:
        one = tokenizer.encode(text, add_special_tokens=False)
        if len(one) == 1 and one[0] not in ids:
            ids.append(one[0])
    return ids


def split_finish(ids: list[int], eos_ids: Sequence[int], stop: Sequence[str], decode) -> Generated:
    """Cut one raw generated row (possibly followed by padding) at its first end token or stop
    string, whichever comes first, and say which it was."""
    eos_at = next((i for i, t in enumerate(ids) if t in eos_ids), None)
    body = ids if eos_at is None else ids[:eos_at]
    text = decode(body)
    hit = [text.find(s) for s in stop if s and s in text]
    if hit:  # shortest prefix of tokens whose text holds the stop string (binary search on prefixes)
        end_char = min(hit) + len(next(s for s in stop if s and text.find(s) == min(hit)))
        lo, hi = 1, len(body)
        while lo < hi:
            mid = (lo + hi) // 2
            if len(decode(body[:mid])) >= end_char:
                hi = mid
            else:
                lo = mid + 1
        return Generated(body[:lo], "stop", decode(body[:lo]))
    if eos_at is not None:
        return Generated(ids[: eos_at + 1], "eos", text)
    return Generated(list(ids), "length", text)


class HFBackend:
    """`transformers` `generate`, batched over the active trajectories (left padding).

    Sampling goes through `_RowSampler`, a logits processor that draws each row's token with its own
    seeded `torch.Generator` and hands `generate` a one-hot score, so `generate` runs greedy and
    just follows the draw. Control tokens other than the end tokens are suppressed: a sampled
    `<|im_start|>` inside a turn would be read back as structure, not text.
    """

    def __init__(self, model, tokenizer, end_texts: Sequence[str] = (), batch_size: int = 64):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.eos_ids = end_token_ids(tokenizer, end_texts, model)
        specials = set(getattr(tokenizer, "all_special_ids", []))
        specials |= {i for i, t in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).items() if t.special}
        self.suppress = sorted(i for i in specials if i not in self.eos_ids and i < model.config.vocab_size)
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.eos_ids[0]

    @classmethod
    def from_pretrained(cls, name: str, tokenizer=None, dtype: str = "auto", device: str = "auto",
                        trust_remote_code: bool = False, **kwargs) -> "HFBackend":
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = tokenizer or AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
        torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype, trust_remote_code=trust_remote_code)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        return cls(model.to(device).eval(), tokenizer, **kwargs)

    def generate(self, prompts_ids, params, seeds, max_new_tokens) -> list[Generated]:
        out: list[Generated] = []
        for start in range(0, len(prompts_ids), self.batch_size):
            end = start + self.batch_size
            out += self._batch(prompts_ids[start:end], params, seeds[start:end], max_new_tokens[start:end])
        return out

    def _batch(self, prompts_ids, params, seeds, budgets) -> list[Generated]:
        import torch
        from transformers import GenerationConfig, LogitsProcessorList

        device = self.model.device
        width = max(len(p) for p in prompts_ids)
        ids = torch.full((len(prompts_ids), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, p in enumerate(prompts_ids):  # left padding: every row's next token is at the end
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        stop = [s for s in params.stop if s]
        config = GenerationConfig(max_new_tokens=max(budgets), do_sample=False, eos_token_id=self.eos_ids,
                                  pad_token_id=self.pad_id, suppress_tokens=self.suppress or None,
                                  stop_strings=stop or None)
        processors = LogitsProcessorList([_RowSampler(seeds, params)] if params.temperature > 0 else [])
        with torch.no_grad():
            result = self.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                         generation_config=config, logits_processor=processors,
                                         tokenizer=self.tokenizer if stop else None)
        new = result[:, width:].tolist()
        decode = lambda t: self.tokenizer.decode(t, skip_special_tokens=False)  # noqa: E731
        gens = []
        for row, budget in zip(new, budgets):
            g = split_finish(row, self.eos_ids, stop, decode)
            if len(g.token_ids) > budget:  # this row's own budget is below the batch's
                g = Generated(g.token_ids[:budget], "length", decode(g.token_ids[:budget]))
            gens.append(g)
        return gens


class _RowSampler:
    """Logits processor: temperature + top-p (transformers' own warpers), then one draw per row from
    that row's generator; returns scores that are 0 at the drawn token and -inf elsewhere."""

    def __init__(self, seeds: Sequence[int], params: SamplingParams):
        from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

        self.seeds = list(seeds)
        self.generators = None
        warpers = [TemperatureLogitsWarper(params.temperature)]
        if params.top_p < 1:
            warpers.append(TopPLogitsWarper(params.top_p))
        self.warpers = LogitsProcessorList(warpers)

    def __call__(self, input_ids, scores):
        import torch

        if self.generators is None:  # created on the scores' device, once per generate call
            self.generators = [torch.Generator(device=scores.device).manual_seed(s) for s in self.seeds]
        probs = self.warpers(input_ids, scores.float()).softmax(-1)
        picks = torch.cat([torch.multinomial(probs[r], 1, generator=g) for r, g in enumerate(self.generators)])
        out = torch.full_like(scores, -math.inf)
        out[torch.arange(len(picks), device=scores.device), picks] = 0.0
        return out


class VLLMBackend:
    """vLLM's offline engine. Prompts go in as token ids (the rollout's own rendering), one
    `SamplingParams` per row (its seed and budget); prefix caching shares the prompt of the n samples.
    `engine` / `sampling_params_cls` can be injected (tests use fakes; vLLM is imported lazily)."""

    def __init__(self, model: str | None = None, tokenizer=None, end_texts: Sequence[str] = (),
                 tensor_parallel_size: int = 1, data_parallel_size: int = 1, gpu_memory_utilization: float = 0.9,
                 dtype: str = "auto", seed: int = 0, engine=None, sampling_params_cls=None, **engine_kwargs):
        if engine is None:
            try:
                from vllm import LLM
            except ImportError:
                raise ImportError('backend "vllm" needs vLLM: pip install "mtpo[vllm]"') from None
            extra = {"data_parallel_size": data_parallel_size} if data_parallel_size > 1 else {}
            engine = LLM(model=model, tokenizer=getattr(tokenizer, "name_or_path", None) or model,
                         enable_prefix_caching=True, tensor_parallel_size=tensor_parallel_size,
                         gpu_memory_utilization=gpu_memory_utilization, dtype=dtype, seed=seed,
                         **extra, **engine_kwargs)
        if sampling_params_cls is None:
            from vllm import SamplingParams as sampling_params_cls
        self.engine, self.sampling_params_cls, self.tokenizer = engine, sampling_params_cls, tokenizer
        self.eos_ids = end_token_ids(tokenizer, end_texts) if tokenizer is not None else []

    def generate(self, prompts_ids, params, seeds, max_new_tokens) -> list[Generated]:
        stop = [s for s in params.stop if s]
        sampling = [self.sampling_params_cls(
            temperature=params.temperature, top_p=params.top_p, max_tokens=budget, seed=seed, stop=stop,
            stop_token_ids=self.eos_ids, include_stop_str_in_output=True, skip_special_tokens=False)
            for seed, budget in zip(seeds, max_new_tokens)]
        prompts = [{"prompt_token_ids": list(p)} for p in prompts_ids]
        results = self.engine.generate(prompts, sampling_params=sampling, use_tqdm=False)
        return [self._convert(r.outputs[0]) for r in results]

    def _convert(self, out) -> Generated:
        ids = list(out.token_ids)
        if out.finish_reason == "length":
            return Generated(ids, "length", out.text)
        if isinstance(out.stop_reason, str):  # a stop string; token_ids hold the tokens that spelled it
            return Generated(ids, "stop", out.text)
        # eos or one of stop_token_ids: vLLM keeps that token as the last id
        return Generated(ids, "eos", out.text)
