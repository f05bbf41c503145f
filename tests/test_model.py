"""Model invariants: step equals teacher forcing, padding never leaks, state selection, tying."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from seq2seq.config import ConfigError, ModelConfig
from seq2seq.model import CharLM, LMState, Seq2Seq, TranslationState, build_model
from seq2seq.model import attention as attention_module
from seq2seq.model import seq2seq as seq2seq_module
from seq2seq.model.attention import BahdanauAttention
from seq2seq.model.recurrent import OutputLayer, padded_vocab
from seq2seq.tokenizer import BOS, EOS, PAD

VOCAB = 13  # not a multiple of 8: the padded vocabulary must never reach callers


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors gain nothing from threads, and a busy shared CPU makes them wait."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(cell: str = "lstm", **overrides) -> ModelConfig:
    values = dict(cell=cell, embed_dim=12, hidden_size=16, encoder_layers=3, decoder_layers=3,
                  dropout=0.1, init_scale=0.3)
    return ModelConfig(**(values | overrides))


def translation(cell: str = "lstm", **overrides) -> Seq2Seq:
    torch.manual_seed(0)
    return build_model(tiny(cell, **overrides), VOCAB, "translation").eval()


def source_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """src (3, 6) padded with PAD, each row ending in EOS, and its lengths."""
    lengths = torch.tensor([6, 3, 4])
    src = torch.randint(4, VOCAB, (3, 6), generator=torch.Generator().manual_seed(1))
    steps = torch.arange(6)
    src[steps == (lengths - 1).unsqueeze(1)] = EOS
    src[steps >= lengths.unsqueeze(1)] = PAD
    return src, lengths


def target_batch() -> torch.Tensor:
    tgt = torch.randint(4, VOCAB, (3, 5), generator=torch.Generator().manual_seed(2))
    tgt[:, 0] = BOS
    return tgt


def tensors(value) -> list[torch.Tensor]:
    """Every tensor of a state, in field order."""
    out = []
    for field in dataclasses.fields(value):
        part = getattr(value, field.name)
        out += list(part) if isinstance(part, tuple) else [torch.as_tensor(part)]
    return out


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("bridge", [False, True])
@pytest.mark.parametrize("layers", [1, 3])
def test_translation_step_equals_teacher_forcing(cell, bridge, layers):
    model = translation(cell, bridge=bridge, decoder_layers=layers)
    src, lengths = source_batch()
    tgt = target_batch()
    with torch.no_grad():
        expected = F.log_softmax(model(src, lengths, tgt), dim=-1)  # (B, T, V)
        state = model.start(src, lengths)
        coverage = torch.zeros(src.shape)
        for t in range(tgt.size(1)):
            log_probs, state = model.step(tgt[:, t], state)
            assert log_probs.dtype == torch.float32 and log_probs.shape == (3, VOCAB)
            torch.testing.assert_close(log_probs, expected[:, t], atol=1e-5, rtol=0)
            coverage += state.attention
    torch.testing.assert_close(state.coverage, coverage)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_lm_step_equals_forward(cell):
    torch.manual_seed(0)
    model = build_model(tiny(cell), VOCAB, "lm").eval()
    ids = torch.randint(0, VOCAB, (2, 7))
    with torch.no_grad():
        logits, _ = model(ids)
        expected = F.log_softmax(logits, dim=-1)
        state = model.start(2)
        for t in range(ids.size(1)):
            log_probs, state = model.step(ids[:, t], state)
            torch.testing.assert_close(log_probs, expected[:, t], atol=1e-5, rtol=0)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_lm_state_carries_across_chunks(cell):
    torch.manual_seed(0)
    model = build_model(tiny(cell), VOCAB, "lm").eval()
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        whole, _ = model(ids)
        first, state = model(ids[:, :4])
        second, _ = model(ids[:, 4:], state.detach())
    torch.testing.assert_close(torch.cat([first, second], dim=1), whole, atol=1e-5, rtol=0)
    assert whole.shape == (2, 9, VOCAB)


@pytest.mark.parametrize("bridge", [False, True])
def test_padding_changes_nothing_at_real_positions(bridge):
    model = translation(bridge=bridge)
    src, lengths = source_batch()
    tgt = target_batch()
    # Two more padding columns, and garbage (non-PAD ids) in every padding position.
    padded = F.pad(src, (0, 2), value=PAD)
    garbage = torch.where(torch.arange(8) < lengths.unsqueeze(1), padded, 5)
    with torch.no_grad():
        memory, mask = model.encode(src, lengths)
        logits = model(src, lengths, tgt)
        for other in (padded, garbage):
            memory2, _ = model.encode(other, lengths)
            torch.testing.assert_close(memory2[:, :6], memory, atol=1e-6, rtol=0)
            assert memory2[:, 6:].abs().sum() == 0
            torch.testing.assert_close(model(other, lengths, tgt), logits, atol=1e-6, rtol=0)
        # Target padding after the end does not reach earlier target positions (causal decoder).
        longer = model(src, lengths, F.pad(tgt, (0, 2), value=PAD))
    torch.testing.assert_close(longer[:, :5], logits, atol=1e-6, rtol=0)
    assert memory[~mask].abs().sum() == 0


def test_target_vocabulary_scores_only_its_ids_and_steps_match_teacher_forcing():
    """A restricted classifier gives logits over the kept ids (specials always kept): the full
    model's logits at those ids; step() returns their log-softmax, column j for id
    output_ids()[j], as teacher forcing does; positions() maps ids to columns, unknown ids to
    UNK's."""
    model = translation(target_vocabulary=True)
    kept = torch.tensor([5, 7, 8, 11])
    model.output.restrict(kept)
    ids = model.output.target_ids()
    assert ids.tolist() == [0, 1, 2, 3, 5, 7, 8, 11]
    assert model.output.positions(torch.tensor([[0, 3, 5, 11], [8, 6, 12, 7]])).tolist() == \
        [[0, 3, 4, 7], [6, 1, 1, 5]]
    src, lengths = source_batch()
    tgt = target_batch().clamp(max=8)
    with torch.no_grad():
        logits = model(src, lengths, tgt)  # (B, T, V')
        assert logits.shape == (3, 5, len(ids))
        full = translation(target_vocabulary=True)  # same seed: the same weights, all ids
        torch.testing.assert_close(logits, full(src, lengths, tgt)[..., ids])
        expected = F.log_softmax(logits, dim=-1)
        state = model.start(src, lengths)
        for t in range(tgt.size(1)):
            log_probs, state = model.step(tgt[:, t], state)
            torch.testing.assert_close(log_probs, expected[:, t], atol=1e-5, rtol=0)
    assert torch.equal(model.output_ids(), ids) and translation().output_ids() is None


@pytest.mark.parametrize("kept,vocab", [(3963, 8000), (4000, 8000), (13, 13), (64, 67)])
def test_decoding_log_probs_equal_log_softmax_of_the_logits_bit_for_bit(kept, vocab):
    """``OutputLayer.log_probs`` scores rows padded to a multiple of 8 with -inf bias and
    returns a view of the first columns: exactly ``log_softmax(forward(x))``, whose classifier
    has no padding rows; the same for a whole (padded) vocabulary, as in the character LM."""
    torch.manual_seed(kept)
    embedding = torch.nn.Embedding(padded_vocab(vocab), 64)
    layer = OutputLayer(96, embedding, vocab, project=True, tie=True, dropout=0.1,
                        init_scale=0.1, target_vocabulary=kept < vocab).eval()
    if kept < vocab:
        layer.restrict(torch.randperm(vocab - 4)[: kept - 4] + 4)
    torch.nn.init.normal_(layer.bias)
    features = torch.randn(37, 96)
    with torch.no_grad():
        expected = torch.log_softmax(layer(features), dim=-1)
        got = layer.log_probs(features)
        weight, bias, columns = layer._decoding_classifier()
    assert got.shape == (37, kept) and columns == kept
    assert torch.equal(got, expected)
    assert weight.shape[0] % 8 == 0 and torch.isneginf(bias[kept:]).all()
    assert got.stride(0) == weight.shape[0]  # a view of the padded rows, not a copy


def test_target_vocabulary_travels_with_the_weights():
    model = translation(target_vocabulary=True)
    model.output.restrict(torch.tensor([6, 9]))
    other = translation(target_vocabulary=True)
    assert other.output.target_ids().numel() == VOCAB
    other.load_state_dict(model.state_dict())
    assert other.output.target_ids().tolist() == [0, 1, 2, 3, 6, 9]
    assert other.output.flops() == 2 * 6 * 12 + 2 * 32 * 12  # classifier rows + projection
    with pytest.raises(ValueError, match="without a target vocabulary"):
        translation().output.restrict(torch.tensor([6]))


def test_decoding_reuses_the_compact_classifier_until_the_weights_change():
    """Without autograd the target vocabulary's classifier rows are gathered once and reused;
    an optimizer step, a new restriction or loaded weights are seen at the next call."""
    model = translation(target_vocabulary=True).eval()
    model.output.restrict(torch.tensor([5, 7, 8]))
    features = torch.randn(4, 32)

    def fresh() -> torch.Tensor:
        with torch.enable_grad():
            return model.output(features).detach()

    with torch.no_grad():
        first = model.output(features)
        kept = model.output._decoding_classifier()
        assert kept[0] is model.output._decoding_classifier()[0]  # reused
        assert model.output._classifier()[0].data_ptr() == kept[0].data_ptr()
    assert torch.equal(first, fresh())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model.output(features).sum().backward()
    optimizer.step()
    with torch.inference_mode():
        assert torch.equal(model.output(features), fresh())
        assert not torch.equal(model.output(features), first)
    model.output.restrict(torch.tensor([5, 9]))
    with torch.no_grad():
        assert model.output(features).shape == (4, 6)
        assert torch.equal(model.output(features), fresh())
    model.load_state_dict(translation(target_vocabulary=True).state_dict())
    with torch.no_grad():
        assert torch.equal(model.output(features), fresh())


@pytest.mark.parametrize("target_vocabulary", [False, True])
def test_decoding_steps_take_the_bottom_input_gates_from_a_table(monkeypatch, target_vocabulary):
    """A step's bottom LSTM reads E W_ih + b from the table (never running the layer) and gives
    what teacher forcing gives; ids outside a target vocabulary's table run the layer."""
    model = translation(target_vocabulary=target_vocabulary).eval()
    if target_vocabulary:
        model.output.restrict(torch.arange(4, 9))
    src, lengths = source_batch()
    tgt = target_batch().clamp(max=8)
    with torch.no_grad():
        expected = F.log_softmax(model(src, lengths, tgt), dim=-1)  # T > 1: the fused layer
        table, row_of = model.input_gate_table()
        assert table.shape == ((9 if target_vocabulary else 16), 4 * 16)
        assert (row_of is None) != target_vocabulary
        state = model.start(src, lengths)
        with monkeypatch.context() as patch:
            patch.setattr(model.decoder_bottom, "forward", None)  # any call fails
            for t in range(tgt.size(1)):
                log_probs, state = model.step(tgt[:, t], state)
                torch.testing.assert_close(log_probs, expected[:, t], atol=1e-5, rtol=0)
        if target_vocabulary:  # id 12 has no row: this step runs the layer
            model.step(torch.full((3,), 12), state)
    assert model.input_gate_table() is not None
    assert translation(cell="gru").input_gate_table() is None
    monkeypatch.setattr(seq2seq_module, "INPUT_TABLE_BYTES", 100)
    assert model.input_gate_table() is None


@pytest.mark.parametrize("task", ["translation", "lm"])
def test_decoding_steps_run_lstm_layers_as_two_matmuls_and_a_cell(monkeypatch, task):
    """A one-position LSTM layer without autograd is :func:`lstm_step`, never the fused kernel,
    and gives what teacher forcing gives; with autograd the fused kernel runs."""
    src, lengths = source_batch()
    tgt = target_batch()
    model = (translation() if task == "translation"
             else build_model(tiny(), VOCAB, "lm").eval())
    stack = model.decoder_upper if task == "translation" else model.rnn
    with torch.no_grad():
        if task == "translation":
            expected = F.log_softmax(model(src, lengths, tgt), dim=-1)
            state = model.start(src, lengths)
        else:
            expected = F.log_softmax(model(tgt)[0], dim=-1)
            state = model.start(tgt.size(0))
        with monkeypatch.context() as patch:
            for layer in stack.layers:
                patch.setattr(layer, "forward", None)  # any call fails
            for t in range(tgt.size(1)):
                log_probs, state = model.step(tgt[:, t], state)
                torch.testing.assert_close(log_probs, expected[:, t], atol=1e-5, rtol=0)
    with monkeypatch.context() as patch:
        for layer in stack.layers:
            patch.setattr(layer, "forward", None)
        with pytest.raises(TypeError):  # with autograd a step runs nn.LSTM
            model.step(tgt[:, 0], state)


def test_the_input_gate_table_follows_the_weights():
    model = translation().eval()
    with torch.no_grad():
        first = model.input_gate_table()[0]
        assert model.input_gate_table()[0] is first
        model.decoder_bottom.layers[0].weight_ih_l0.add_(0.5)
        second = model.input_gate_table()[0]
        assert not torch.equal(first, second)
        lstm = model.decoder_bottom.layers[0]
        expected = (model.tgt_embed.weight @ lstm.weight_ih_l0.t() + lstm.bias_ih_l0
                    + lstm.bias_hh_l0)
        torch.testing.assert_close(second, expected)


def test_bridge_starts_the_decoder_from_the_source():
    """With the bridge two sources give the decoder different first states (from the mean encoder
    output, padding excluded); without it the first state is zero whatever the source."""
    src, lengths = source_batch()
    for bridge in (False, True):
        model = translation(bridge=bridge)
        with torch.no_grad():
            state = model.start(src, lengths)
            memory, mask = model.encode(src, lengths)
        h = state.bottom[0][:, 0]  # (B, H)
        if not bridge:
            assert h.abs().sum() == 0 and all(p.abs().sum() == 0 for p in state.upper)
            continue
        mean = memory.sum(1) / mask.sum(1, keepdim=True)
        expected = torch.tanh(model.bridge(mean)[:, : model.config.hidden_size])
        torch.testing.assert_close(h, expected)
        assert not torch.allclose(h[0], h[1])
        assert state.upper[0].shape == (3, 2, 16) and state.upper[1].abs().sum() > 0


def test_bidirectional_encoder_sees_the_future():
    model = translation()
    src, lengths = source_batch()
    changed = src.clone()
    changed[0, 4] = 4 if src[0, 4] != 4 else 5  # a late token of row 0
    with torch.no_grad():
        memory, _ = model.encode(src, lengths)
        memory2, _ = model.encode(changed, lengths)
    assert not torch.allclose(memory[0, 0], memory2[0, 0])  # the backward direction carried it
    torch.testing.assert_close(memory[1:], memory2[1:])


def stepped_state(model: Seq2Seq) -> TranslationState:
    src, lengths = source_batch()
    state = model.start(src, lengths)
    for t in range(2):
        _, state = model.step(target_batch()[:, t], state)
    return state


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_select_identity_composition_and_rows(cell):
    model = translation(cell)
    with torch.no_grad():
        state = stepped_state(model)
        same = state.select(torch.arange(3))
        for a, b in zip(tensors(state), tensors(same), strict=True):
            assert torch.equal(a, b)
        a, b = torch.tensor([2, 0, 0, 1]), torch.tensor([3, 1, 1])
        for x, y in zip(tensors(state.select(a).select(b)), tensors(state.select(a[b])),
                        strict=True):
            assert torch.equal(x, y)
        # A selected state steps exactly like the same rows of the whole batch.
        prev = torch.tensor([4, 5, 6])
        log_probs, _ = model.step(prev, state)
        picked, _ = model.step(prev[a], state.select(a))
    torch.testing.assert_close(picked, log_probs[a], atol=1e-5, rtol=0)
    assert len(state.bottom) == (2 if cell == "lstm" else 1)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_step_and_select_leave_the_given_state_unchanged(cell):
    """A state is a value: beam search steps and selects from one state more than once."""
    model = translation(cell)
    lm = build_model(tiny(cell), VOCAB, "lm").eval()
    prev = torch.tensor([4, 5, 6])
    with torch.no_grad():
        for step, state in ((model.step, stepped_state(model)),
                            (lm.step, lm.step(prev, lm.start(3))[1])):
            before = [t.clone() for t in tensors(state)]
            first, after = step(prev, state)
            state.select(torch.tensor([2, 0, 0]))
            again, _ = step(prev, state)
            for old, now in zip(before, tensors(state), strict=True):
                assert torch.equal(old, now)
            assert torch.equal(first, again)
            assert not all(torch.equal(a, b) for a, b in zip(tensors(after), before, strict=True))


def test_beam_groups_attend_like_rows_gathered_one_by_one():
    """Rows laid out as k consecutive beams per sentence take the grouped attention path; the
    same rows in another order gather the memory per row. Both give the same log-probs."""
    model = translation()
    with torch.no_grad():
        state = stepped_state(model)
        grouped = state.select(torch.arange(3).repeat_interleave(2))
        order = torch.tensor([4, 5, 0, 1, 2, 3])  # sentences 2, 0, 1: not in order
        scattered = state.select(torch.arange(3).repeat_interleave(2)[order])
        assert grouped.group == 2 and scattered.group == 0
        assert grouped.memory.shape[0] == scattered.memory.shape[0] == 3  # never per beam
        prev = torch.tensor([4, 5, 6, 7, 8, 9])
        log_probs, after = model.step(prev, grouped)
        reordered, after_scattered = model.step(prev[order], scattered)
        # A sentence with no rows left leaves the memory.
        dropped = after.select(torch.tensor([0, 1, 4, 5]))
    torch.testing.assert_close(reordered, log_probs[order], atol=1e-5, rtol=0)
    torch.testing.assert_close(after_scattered.coverage, after.coverage[order])
    assert dropped.memory.shape[0] == 2 and dropped.group == 2
    assert torch.equal(dropped.memory, after.memory[[0, 2]])


def test_lm_state_select_and_detach():
    torch.manual_seed(0)
    model = build_model(tiny(), VOCAB, "lm")
    _, state = model(torch.randint(0, VOCAB, (3, 4)))
    assert all(part.requires_grad for part in state.rnn)
    detached = state.detach()
    assert isinstance(detached, LMState) and not any(p.requires_grad for p in detached.rnn)
    index = torch.tensor([2, 2, 0])
    for x, y in zip(state.select(index).rnn, state.rnn, strict=True):
        assert torch.equal(x, y[index]) and x.shape == (3, 3, 16)


def test_attention_weights_sum_to_one_and_vanish_at_padding():
    torch.manual_seed(0)
    attention = BahdanauAttention(8, 6, 10, init_scale=0.5)
    memory = torch.randn(2, 5, 6)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    context, weights = attention(torch.randn(2, 4, 8), attention.keys(memory), memory, mask)
    assert context.shape == (2, 4, 6) and weights.shape == (2, 4, 5)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4))
    assert weights[1, :, 2:].abs().sum() == 0
    torch.testing.assert_close(context[1], weights[1, :, :2] @ memory[1, :2])
    # The same through the decoder state.
    state = stepped_state(translation())
    torch.testing.assert_close(state.attention.sum(-1), torch.ones(3))
    row_mask = state.mask.index_select(0, state.source)
    assert state.attention[~row_mask].abs().sum() == 0
    assert state.coverage[~row_mask].abs().sum() == 0


@pytest.mark.parametrize("rows", [1, 100])
def test_blockwise_scores_match_plain_autograd(monkeypatch, rows):
    monkeypatch.setattr(attention_module, "_block_rows", lambda q, k: rows)
    torch.manual_seed(0)
    q, k, v = (torch.randn(*shape, dtype=torch.float64, requires_grad=True)
               for shape in [(2, 3, 4), (2, 5, 4), (4,)])
    scores = attention_module._AdditiveScores.apply(q, k, v)
    expected = torch.matmul(torch.tanh(q.unsqueeze(2) + k.unsqueeze(1)), v)  # (B, T, S)
    torch.testing.assert_close(scores, expected)
    assert torch.autograd.gradcheck(attention_module._AdditiveScores.apply, (q, k, v),
                                    fast_mode=True)


def test_tied_embeddings_share_storage():
    model = translation()
    ptr = model.src_embed.weight.data_ptr()
    assert model.tgt_embed.weight.data_ptr() == ptr == model.output.weight.data_ptr()
    assert model.src_embed.weight.shape == (16, 12)  # vocabulary padded to a multiple of 8
    untied_output = translation(output_projection=False)
    assert untied_output.tgt_embed.weight.data_ptr() == untied_output.src_embed.weight.data_ptr()
    assert untied_output.output.weight.data_ptr() != untied_output.src_embed.weight.data_ptr()
    untied = translation(tie_embeddings=False)
    ptrs = {untied.src_embed.weight.data_ptr(), untied.tgt_embed.weight.data_ptr(),
            untied.output.weight.data_ptr()}
    assert len(ptrs) == 3
    lm = build_model(tiny(), VOCAB, "lm")
    assert lm.output.weight.data_ptr() == lm.embed.weight.data_ptr()


def test_forget_gate_bias_sums_to_one():
    model = translation()
    lstms = [m for m in model.modules() if isinstance(m, torch.nn.LSTM)]
    assert len(lstms) == 2 + 2 + 3  # two directions, two upper encoder layers, three decoder
    for lstm in lstms:
        h = lstm.hidden_size
        total = lstm.bias_ih_l0 + lstm.bias_hh_l0
        torch.testing.assert_close(total[h : 2 * h], torch.ones(h))
        assert total[:h].abs().sum() == 0 and total[2 * h :].abs().sum() == 0
        assert lstm.weight_hh_l0.abs().max() <= 0.3


def test_build_model_tasks_and_shapes():
    src, lengths = source_batch()
    model = translation(encoder_layers=1, decoder_layers=1)
    assert model.vocab_size == VOCAB and model.config.encoder_layers == 1
    assert model(src, lengths, target_batch()).shape == (3, 5, VOCAB)
    assert model.start(src, lengths).upper == ()
    with pytest.raises(ConfigError, match="task"):
        build_model(tiny(), VOCAB, "speech")


def test_flops_per_token_counts_by_hand():
    config = tiny(decoder_layers=2)
    lm = CharLM(config, VOCAB)
    # Layer 1: 2*(12+16)*4*16, layer 2: 2*(16+16)*4*16; projection 2*16*12; classifier 2*12*16.
    forward = 2 * 28 * 64 + 2 * 32 * 64 + 2 * 16 * 12 + 2 * 12 * 16
    assert lm.flops_per_token(training=False) == forward
    assert lm.flops_per_token() == 3 * forward
    model = translation()
    assert model.flops_per_token(10, 10) > model.flops_per_token(5, 5) > 0  # attention grows


def greedy(model: Seq2Seq, src: torch.Tensor, lengths: torch.Tensor, steps: int) -> torch.Tensor:
    state = model.start(src, lengths)
    prev, out = torch.full((src.size(0),), BOS), []
    for _ in range(steps):
        log_probs, state = model.step(prev, state)
        prev = log_probs.argmax(-1)
        out.append(prev)
    return torch.stack(out, dim=1)


def test_tiny_model_overfits_a_handful_of_pairs():
    torch.manual_seed(0)
    config = tiny(embed_dim=16, hidden_size=32, encoder_layers=2, decoder_layers=2, dropout=0.0)
    model = build_model(config, VOCAB, "translation")
    src = torch.randint(4, VOCAB, (8, 6))
    src[:, -1] = EOS
    lengths = torch.full((8,), 6)
    tgt_out = torch.cat([src[:, :-1].flip(1), src[:, -1:]], dim=1)  # reversed source, then EOS
    tgt_in = torch.cat([torch.full((8, 1), BOS), tgt_out[:, :-1]], dim=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        loss = F.cross_entropy(model(src, lengths, tgt_in).flatten(0, 1), tgt_out.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        assert torch.equal(greedy(model, src, lengths, 6), tgt_out)


@pytest.mark.parametrize("kind", ["StepLSTM", "SplitGatesLSTM"])
def test_step_lstms_are_the_same_function_as_the_fused_lstm(kind):
    """StepLSTM (one [x; h] matmul per step) and SplitGatesLSTM (x W_ih + b, then a matmul of h)
    with fp32 linears equal nn.LSTM; with their linears int8 they stay close."""
    from torch.ao.quantization import quantize_dynamic

    from seq2seq.model import quantize

    torch.manual_seed(0)
    lstm = torch.nn.LSTM(6, 8, batch_first=True)
    with torch.no_grad():
        lstm.bias_ih_l0.uniform_(-0.5, 0.5)
    x, h0, c0 = torch.randn(3, 5, 6), torch.randn(1, 3, 8), torch.randn(1, 3, 8)
    step = getattr(quantize, kind).from_lstm(lstm)
    with torch.no_grad():
        expected, (h, c) = lstm(x, (h0, c0))
        got, (h2, c2) = step(x, (h0, c0))
        from_zero, _ = step(x)
        int8 = quantize_dynamic(torch.nn.Sequential(step), {torch.nn.Linear}, dtype=torch.qint8)[0]
        approx, _ = int8(x, (h0, c0))
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close((h2, c2), (h, c), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(from_zero, lstm(x)[0].detach(), atol=1e-6, rtol=1e-5)
    linear = int8.gates if kind == "StepLSTM" else int8.hidden_gates
    assert isinstance(linear, torch.ao.nn.quantized.dynamic.Linear)
    assert (approx - expected).abs().max() < 0.05
    with pytest.raises(ValueError, match="single-layer"):
        getattr(quantize, kind).from_lstm(torch.nn.LSTM(6, 8, num_layers=2, batch_first=True))


@pytest.mark.parametrize("target_vocabulary", [False, True])
def test_int8_model_quantises_decoder_lstms_and_stays_close(target_vocabulary, monkeypatch):
    """The upper decoder layers become StepLSTMs, the bottom one a SplitGatesLSTM whose input
    half a step reads from the same table as the fp32 model (the layer itself never runs)."""
    from seq2seq.model import quantize_int8
    from seq2seq.model.quantize import SplitGatesLSTM, StepLSTM

    model = translation(target_vocabulary=target_vocabulary).eval()
    if target_vocabulary:
        model.output.restrict(torch.tensor([4, 5, 9, 10]))
    int8 = quantize_int8(model)
    assert all(isinstance(layer, StepLSTM) for layer in int8.decoder_upper.layers)
    assert isinstance(int8.decoder_bottom.layers[0], SplitGatesLSTM)
    assert isinstance(int8.decoder_bottom.layers[0].hidden_gates,
                      torch.ao.nn.quantized.dynamic.Linear)
    assert isinstance(int8.encoder_upper.layers[0], torch.nn.LSTM)  # whole sentences: fused fp32
    assert isinstance(model.decoder_bottom.layers[0], torch.nn.LSTM)  # the original is untouched
    src, lengths = source_batch()
    with torch.no_grad():
        assert torch.equal(int8.input_gate_table()[0], model.input_gate_table()[0])
        exact, _ = model.step(torch.tensor([4, 5, 9]), model.start(src, lengths))
        monkeypatch.setattr(int8.decoder_bottom, "forward", None)  # any call fails
        approx, _ = int8.step(torch.tensor([4, 5, 9]), int8.start(src, lengths))
    assert (approx.exp() - exact.exp()).abs().max() < 0.02


@pytest.mark.parametrize("task,cell", [("translation", "gru"), ("lm", "lstm"), ("lm", "gru")])
def test_int8_quantises_gru_models_and_the_character_lm_and_stays_close(task, cell):
    from seq2seq.model import quantize_int8
    from seq2seq.model.quantize import StepLSTM

    torch.manual_seed(0)
    model = build_model(tiny(cell), VOCAB, task).eval()
    int8 = quantize_int8(model)
    quantized = [m for m in int8.modules()
                 if isinstance(m, torch.ao.nn.quantized.dynamic.Linear)]
    assert quantized  # the linear layers run int8
    stacks = [int8.rnn] if task == "lm" else [int8.decoder_bottom, int8.decoder_upper]
    layers = [layer for stack in stacks for layer in stack.layers]
    kind = StepLSTM if cell == "lstm" else torch.nn.GRU  # GRU layers stay fp32
    assert all(isinstance(layer, kind) for layer in layers)
    prev = torch.tensor([4, 5, 6])
    with torch.no_grad():
        if task == "lm":
            exact_state, approx_state = model.start(3), int8.start(3)
            for ids in (prev, torch.tensor([7, 8, 9])):  # two steps: the state carries over
                exact, exact_state = model.step(ids, exact_state)
                approx, approx_state = int8.step(ids, approx_state)
        else:
            src, lengths = source_batch()
            exact, _ = model.step(prev, model.start(src, lengths))
            approx, _ = int8.step(prev, int8.start(src, lengths))
    assert approx.shape == exact.shape == (3, VOCAB)
    assert not torch.equal(approx, exact)  # int8 arithmetic did run
    assert (approx.exp() - exact.exp()).abs().max() < 0.02


def test_int8_in_place_quantises_the_model_itself_with_the_same_result():
    from seq2seq.model import quantize_int8

    model = translation().eval()
    copied = quantize_int8(model)
    same = quantize_int8(model, inplace=True)
    assert same is model
    src, lengths = source_batch()
    with torch.no_grad():
        a, _ = copied.step(torch.tensor([4, 5, 6]), copied.start(src, lengths))
        b, _ = same.step(torch.tensor([4, 5, 6]), same.start(src, lengths))
    assert torch.equal(a, b)
