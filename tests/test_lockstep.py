"""On-policy sampling in step across processes, as FSDP needs (`kdaudit.train.sampling.Lockstep`).

Under FSDP every forward of the student gathers its sharded weights from all processes, so a
process that stops sampling early, or decides not to sample this step, leaves the others
waiting forever. Two threads stand in for two processes here, with a barrier as the
collective. The stand-in model writes a fixed answer and ends it at a length set per
"process", so the two would stop at different tokens without the lockstep.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch

from kdaudit.config import KDConfig
from kdaudit.data.template import Encoded
from kdaudit.train.methods import METHODS, method_params
from kdaudit.train.sampling import Lockstep, sample_responses
from kdaudit.train.sources import BatchSource
from thread_ranks import Exchange, run_ranks

EOS, PAD, WORD = 1, 0, 5


class StopsAt(torch.nn.Module):
    """A causal-LM stand-in: writes WORD until prompt + answer reach `length` tokens, then
    EOS; counts its forward calls (each would be a collective under FSDP)."""

    def __init__(self, length: int, vocab: int = 16):
        super().__init__()
        self.length, self.vocab, self.calls = length, vocab, 0
        self.anchor = torch.nn.Parameter(torch.zeros(1))   # a device to be on

    def forward(self, input_ids, attention_mask, position_ids, use_cache, past_key_values=None):
        self.calls += 1
        logits = torch.full((*input_ids.shape, self.vocab), -1e4)
        logits[..., EOS if attention_mask.shape[1] >= self.length else WORD] = 0.0
        return SimpleNamespace(logits=logits)


def in_step(fn, world: int = 2) -> list:
    """`fn(rank, lockstep)` in `world` threads sharing one thread-barrier `Lockstep`."""
    exchange = Exchange(world)

    def lockstep(rank: int) -> Lockstep:
        return Lockstep(first=lambda v: exchange.share(rank, v)[0],
                        all=lambda flag: all(exchange.share(rank, flag)))

    return run_ranks(lambda rank: fn(rank, lockstep(rank)), exchange, world)


def test_a_finished_process_keeps_running_the_student_until_every_process_has_finished():
    prompts = [[3, 4, 2], [3, 4, 2, 6]]
    kw = dict(max_new_tokens=20, pad_id=PAD, eos_id=EOS, temperature=0.0)
    models = [StopsAt(8), StopsAt(15)]
    alone = [sample_responses(m, prompts, **kw) for m in models]
    calls_alone = [m.calls for m in models]
    assert calls_alone == [5, 12]          # what would hang under FSDP: 5 forwards against 12
    for m in models:
        m.calls = 0
    together = in_step(lambda r, ls: sample_responses(models[r], prompts, lockstep=ls, **kw))
    assert [m.calls for m in models] == [12, 12]
    assert together == alone               # the extra forwards write nothing
    assert [len(s.tokens) for s in together[0]] == [5, 5]     # prompts left-padded to 4


def test_processes_with_their_own_seeds_take_the_main_process_s_on_policy_decisions():
    """GKD samples on half the steps, drawn from each process's own seed; in step, every
    process follows the main one's draw (and samples for as many tokens)."""
    params = method_params(METHODS["gkd"], KDConfig(max_new_tokens=12, replay_size=0))
    examples = [Encoded([3, 4, 2, 7, 8, EOS], 3) for _ in range(8)]

    def origins(rank, lockstep):
        model = StopsAt(6 + 4 * rank)
        source = BatchSource(METHODS["gkd"], examples, params, pad_id=PAD, eos_id=EOS,
                             seed=rank, max_length=32, batch_size=2, lockstep=lockstep)
        made = [source.next_batch(s, [0, 1], model, None)[1]["generated"] for s in range(16)]
        return made, model.calls

    (own0, calls0), (own1, calls1) = in_step(lambda r, ls: origins(r, None))
    assert own0 != own1 and calls0 != calls1     # each process on its own draws and lengths
    (made0, calls0), (made1, calls1) = in_step(origins)
    assert made0 == made1 == own0 and calls0 == calls1
    assert 0 < sum(m > 0 for m in made0) < 16
