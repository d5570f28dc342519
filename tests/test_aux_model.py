import json

import pytest
import torch
import torch.nn.functional as F

from softthought.aux_model import CheckpointError, SoftThoughtAux
from softthought.backbone import weights_fingerprint
from softthought.splice import build_chat_prompt, embed_prompt

SUMMARIES = ["I prefer answers in French.", "Keep it short; I like bullet lists and lowercase text."]


def test_thoughts_shape_and_norm(smollm, smollm_aux):
    with torch.no_grad():
        th = smollm_aux.encode(SUMMARIES)
    assert th.shape == (2, 8, smollm.hidden_size)
    assert torch.allclose(th.norm(dim=-1), torch.full((2, 8), smollm.embed_norm), rtol=1e-4)
    assert not torch.allclose(th[0], th[1])  # depends on the summary


def test_save_load_round_trip_is_exact(smollm, smollm_aux, aux_dir):
    loaded = SoftThoughtAux.from_pretrained(aux_dir, backbone=smollm).eval()
    with torch.no_grad():
        assert torch.equal(loaded.encode(SUMMARIES), smollm_aux.encode(SUMMARIES))
    assert loaded.version == smollm_aux.version != "unsaved"
    config = json.loads((aux_dir / "config.json").read_text())
    assert config["num_thoughts"] == 8
    assert config["backbone_fingerprint"] == smollm.fingerprint
    assert config["backbone_hidden"] == 576 and config["encoder_hidden"] == 384


def test_guidance_travels_with_the_checkpoint_and_makes_it_another_version(smollm, aux_dir, tmp_path):
    import shutil

    guided = tmp_path / "guided"
    shutil.copytree(aux_dir, guided)
    _edit_config(guided, guidance=2)  # an integer in hand-edited JSON is a float
    loaded = SoftThoughtAux.from_pretrained(guided, backbone=smollm)
    plain = SoftThoughtAux.from_pretrained(aux_dir, backbone=smollm)
    assert loaded.config.guidance == 2 and plain.config.guidance == 1
    assert loaded.version != plain.version  # the same weights guided write other replies
    _edit_config(guided, guidance_gate=0.2)
    gated = SoftThoughtAux.from_pretrained(guided, backbone=smollm)
    assert gated.config.guidance_gate == 0.2 and plain.config.guidance_gate == 0
    assert gated.version not in (loaded.version, plain.version)


def test_checkpoint_stores_only_what_is_trained(aux_dir, smollm_aux):
    from safetensors import safe_open

    with safe_open(aux_dir / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert keys and not any(k.startswith("encoder.") for k in keys)  # frozen encoder comes from its package
    assert (aux_dir / "model.safetensors").stat().st_size < 10e6


def test_checkpoint_for_another_backbone_is_refused_naming_both_fingerprints(aux_dir, smollm, tiny):
    with pytest.raises(CheckpointError) as err:
        SoftThoughtAux.from_pretrained(aux_dir, backbone=tiny)
    assert smollm.fingerprint in str(err.value) and tiny.fingerprint in str(err.value)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: (d / "model.safetensors").write_bytes(b"\x00garbage" * 10), "safetensors"),
        (lambda d: (d / "model.safetensors").unlink(), "missing"),
        (lambda d: (d / "config.json").write_text("{not json"), "not valid JSON"),
        (lambda d: (d / "config.json").unlink(), "missing"),
        (lambda d: _edit_config(d, num_thoughts=4), "wrong shape"),
        (lambda d: _edit_config(d, encoder_training="lora"), "does not match"),
        (lambda d: _edit_config(d, format_version=99), "format_version"),
        (lambda d: _edit_config(d, surprise=1), "unknown fields"),
        (lambda d: _edit_config(d, thoughts_seen_by="prompt"), "thoughts_seen_by must be one of"),
        (lambda d: _edit_config(d, thoughts_at="start"), "thoughts_at must be one of"),
        (lambda d: _edit_config(d, num_thoughts="eight"), "num_thoughts must be of type int, got 'eight'"),
        (lambda d: _edit_config(d, num_heads=0), "must be positive"),
        (lambda d: _edit_config(d, copy_thoughts=True), "copy_thoughts must be of type int"),
        (lambda d: _edit_config(d, thought_norm="big"), "thought_norm must be of type float"),
        (lambda d: _edit_config(d, guidance=11), r"guidance must be in \[0, 10\]"),
        (lambda d: _edit_config(d, guidance="2"), "guidance must be of type float"),
        (lambda d: _edit_config(d, guidance_gate=-0.5), "guidance_gate must be >= 0"),
        (lambda d: _edit_config(d, languages=["fr", "fr"]), "languages must be distinct"),
        (lambda d: _edit_config(d, languages=["fr"]), "does not match"),
        (lambda d: _edit_config(d, language_confidence=1.0), r"language_confidence must be in \[0, 1\)"),
    ],
)
def test_bad_checkpoints_are_refused_with_a_message(aux_dir, tmp_path, smollm, damage, message):
    import shutil

    broken = tmp_path / "ckpt"
    shutil.copytree(aux_dir, broken)
    damage(broken)
    with pytest.raises(CheckpointError, match=message):
        SoftThoughtAux.from_pretrained(broken, backbone=smollm)


def _edit_config(directory, **changes):
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _distillation_loss(backbone, aux, summary, target_text):
    """Teacher-forced cross-entropy of a target reply given the spliced prompt (one training example)."""
    tok, table = backbone.tokenizer, backbone.model.get_input_embeddings()
    thoughts = aux.encode([summary])[0]
    prompt = build_chat_prompt(tok, [{"role": "user", "content": "Say hello."}], thoughts)
    target = tok(target_text, add_special_tokens=False)["input_ids"]
    embeds = torch.cat([embed_prompt(table, prompt), table(torch.tensor(target))])[None]
    logits = backbone.model(inputs_embeds=embeds).logits[0, prompt.num_tokens - 1 : -1]
    return F.cross_entropy(logits, torch.tensor(target))


def test_training_step_moves_only_the_auxiliary_model(smollm):
    torch.manual_seed(0)
    aux = SoftThoughtAux.for_backbone(smollm, num_thoughts=4)
    before_fp = weights_fingerprint(smollm.model)
    opt = torch.optim.AdamW(list(aux.trainable_parameters()), lr=1e-3)
    backbone_ids = {id(p) for p in smollm.model.parameters()}
    assert not any(id(p) in backbone_ids for g in opt.param_groups for p in g["params"])
    before_aux = {k: v.clone() for k, v in aux.persistent_state_dict().items()}
    loss = _distillation_loss(smollm, aux, SUMMARIES[0], "Bonjour !")
    loss.backward()
    opt.step()
    assert all(p.grad is None for p in smollm.model.parameters())
    assert weights_fingerprint(smollm.model) == before_fp == smollm.fingerprint
    after = aux.persistent_state_dict()
    assert any(not torch.equal(before_aux[k], after[k]) for k in after)
    assert all(not p.requires_grad or p.grad is None for n, p in aux.encoder.named_parameters())  # encoder frozen


def test_lora_encoder_trains_adapters_only_and_round_trips(smollm, tmp_path):
    torch.manual_seed(0)
    aux = SoftThoughtAux.for_backbone(smollm, num_thoughts=4, encoder_training="lora")
    enc_trainable = [n for n, p in aux.named_parameters() if n.startswith("encoder.") and p.requires_grad]
    assert enc_trainable and all("lora_" in n for n in enc_trainable)
    trainable = {id(p) for p in aux.trainable_parameters()}
    assert all(id(p) in trainable for n, p in aux.named_parameters() if p.requires_grad)
    opt = torch.optim.AdamW(list(aux.trainable_parameters()), lr=1e-2)
    _distillation_loss(smollm, aux, SUMMARIES[1], "hi there").backward()
    opt.step()
    aux.save_pretrained(tmp_path)
    loaded = SoftThoughtAux.from_pretrained(tmp_path, backbone=smollm)
    aux.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded.encode(SUMMARIES), aux.encode(SUMMARIES))


def test_token_overlap_pairs_tokens_that_share_characters():
    from softthought.aux_model import token_overlap

    outer = torch.tensor([[0, 4], [4, 11], [11, 11]])  # "Use" " lantern" and an empty (special) token
    inner = torch.tensor([[0, 0], [0, 3], [4, 8], [8, 11]])  # [CLS] "use" "lant" "##ern"
    assert torch.equal(token_overlap(outer, inner), torch.tensor([[0, 1, 0, 0], [0, 0, 0.5, 0.5], [0, 0, 0, 0]]))


def test_copy_thoughts_hand_the_backbone_its_own_embeddings_of_the_summarys_tokens(tiny):
    torch.manual_seed(0)
    aux = SoftThoughtAux.for_backbone(tiny, num_thoughts=2, copy_thoughts=3).eval()
    summaries = ['Always end with "Cheers!"', "Use the word lantern twice.", ""]
    with torch.no_grad():
        aux.copy_k.weight.mul_(1e4), aux.copy_e.weight.mul_(1e4)  # attention this sharp picks one token each
        aux.copy_gate.bias.fill_(10.0)  # fully open
        th = aux.encode(summaries)
    assert th.shape == (3, 5, tiny.hidden_size)
    table = tiny.model.get_input_embeddings().weight.to(torch.bfloat16).float()  # copied as bf16, like the fingerprint
    for summary, copied in zip(summaries[:2], th[:, 2:]):
        own = table[tiny.tokenizer(summary, add_special_tokens=False)["input_ids"]]
        nearest = torch.cdist(copied, own).min(dim=1).values
        assert nearest.max() < 1e-3 * table.norm(dim=-1).mean()  # each is one of this summary's tokens
    assert torch.equal(th[2, 2:], torch.zeros(3, tiny.hidden_size))  # an empty summary copies nothing, no NaN


def test_copy_thoughts_round_trip_without_saving_the_backbones_table(tiny, tmp_path):
    torch.manual_seed(0)
    aux = SoftThoughtAux.for_backbone(tiny, num_thoughts=2, copy_thoughts=3).eval()
    with torch.no_grad():
        aux.copy_gate.bias.fill_(0.0)  # half open: the copied rows count in the comparison
    aux.save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert {"copy_queries", "copy_k.weight"} <= keys and "copy_table" not in keys
    # served without a backbone object: the table comes from the backbone the checkpoint names, fingerprint checked
    loaded = SoftThoughtAux.from_pretrained(tmp_path, expected_fingerprint=tiny.fingerprint).eval()
    with torch.no_grad():
        assert torch.equal(loaded.encode(SUMMARIES), aux.encode(SUMMARIES))
    config = json.loads((tmp_path / "config.json").read_text())
    config["backbone_fingerprint"] = "0" * 16
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="copy thoughts need the embeddings of backbone 0000"):
        SoftThoughtAux.from_pretrained(tmp_path)


def test_added_copy_thoughts_keep_the_checkpoint_and_train_without_touching_the_backbone(tiny):
    from softthought.aux_model import CopySource

    torch.manual_seed(0)
    aux = SoftThoughtAux.for_backbone(tiny, num_thoughts=2)
    with torch.no_grad():
        before = aux.encode(SUMMARIES)
    aux.add_copy_thoughts(3, CopySource.of(tiny))
    with pytest.raises(CheckpointError, match="already has 3"):
        aux.add_copy_thoughts(3, CopySource.of(tiny))
    th = aux.encode(SUMMARIES)
    assert torch.equal(th[:, :2].detach(), before)
    # shut gates at first: the copy thoughts are small next to a token (a half-chosen mix would derail the backbone)
    assert th[:, 2:].norm(dim=-1).max() < 0.05 * tiny.embed_norm
    opt = torch.optim.AdamW(list(aux.trainable_parameters()), lr=1e-2)
    assert not any(p is aux.copy_table for g in opt.param_groups for p in g["params"])
    ((th[:, 2:] - 1) ** 2).mean().backward()
    opt.step()
    assert aux.copy_gate.bias.grad.abs().min() > 0 and aux.copy_queries.grad.abs().max() > 0  # all of it learns
    assert all(p.grad is None for p in tiny.model.parameters())
    assert weights_fingerprint(tiny.model) == tiny.fingerprint


def test_the_frozen_backbone_itself_can_read_the_summary(smollm):
    from softthought.backbone import EMBEDDED_BACKBONE

    torch.manual_seed(0)
    aux = SoftThoughtAux.for_backbone(smollm, encoder=EMBEDDED_BACKBONE, num_thoughts=2).eval()
    assert aux.config.encoder_hidden == smollm.hidden_size and aux.tokenizer.vocab == smollm.tokenizer.vocab
    assert not any(p.requires_grad for p in aux.encoder.parameters())  # frozen, so never saved with the checkpoint
    assert not any(k.startswith("encoder.") for k in aux.persistent_state_dict())
    with torch.no_grad():
        th = aux.encode(SUMMARIES)
    assert th.shape == (2, 2, smollm.hidden_size) and not torch.allclose(th[0], th[1])


def test_languages_start_as_the_checkpoint_and_round_trip(tiny, tmp_path):
    from softthought.aux_model import CopySource

    torch.manual_seed(0)
    bare = SoftThoughtAux.for_backbone(tiny, num_thoughts=2)
    bare.add_languages(["de"])
    with pytest.raises(CheckpointError, match="before languages"):  # the offsets are sized for every thought
        bare.add_copy_thoughts(1, CopySource.of(tiny))
    aux = SoftThoughtAux.for_backbone(tiny, num_thoughts=2, copy_thoughts=1).eval()  # the head reads the table too
    with torch.no_grad():
        aux.copy_gate.bias.fill_(0.0)
        before = aux.encode(SUMMARIES)
    aux.add_languages(["de", "fr"])
    with torch.no_grad():
        assert torch.equal(aux.encode(SUMMARIES), before)  # zero offsets: the same thoughts as before
        assert aux.language_logits(SUMMARIES).softmax(-1)[:, 0].min() > 0.99  # none, at first
        aux.language_offsets[1].fill_(0.5)
        aux.language_table_head.weight.normal_()  # the table's part of the logits counts
        with_table = aux.language_logits(SUMMARIES)
        aux.language_table_head.weight.zero_()
        assert not torch.allclose(with_table, aux.language_logits(SUMMARIES))
        forced = aux.encode(SUMMARIES, torch.tensor([[0.0, 1.0]] * len(SUMMARIES)))
        assert torch.allclose(forced - before, torch.full_like(before, 0.5))  # French's offset on every thought
        assert torch.equal(aux.encode(SUMMARIES), before)  # the head chooses none: not a trace of any offset
        aux.language_head.weight.zero_()  # the bias alone decides
        aux.language_head.bias.copy_(torch.tensor([0.0, 0.0, 9.0]))
        assert torch.allclose(aux.encode(SUMMARIES), forced)  # it chooses French: the whole offset, as in training
        aux.language_head.bias.copy_(torch.tensor([0.0, -2.0, 0.5]))  # French, but a language at all only p = 0.64
        assert torch.allclose(aux.encode(SUMMARIES), forced)
        aux.config.language_confidence = 0.8
        assert torch.equal(aux.encode(SUMMARIES), before)  # not sure enough: no language
    aux.save_pretrained(tmp_path)
    loaded = SoftThoughtAux.from_pretrained(tmp_path, backbone=tiny).eval()
    assert loaded.config.languages == ["de", "fr"] and loaded.config.language_confidence == 0.8
    with torch.no_grad():
        assert torch.equal(loaded.encode(SUMMARIES), aux.encode(SUMMARIES))
    aux.config.language_confidence = 0.5
    aux.save_pretrained(tmp_path / "default")
    assert loaded.version != aux.version  # the same weights naming languages more often: another version


@pytest.mark.parametrize("hidden", [0, 16])
def test_a_checkpoint_with_languages_grows_more_forms_keeping_what_it_had(tiny, hidden):
    torch.manual_seed(0)
    aux = SoftThoughtAux.for_backbone(tiny, num_thoughts=2, copy_thoughts=1).eval()
    aux.add_languages(["de", "fr"])
    if hidden:
        aux.new_language_head(hidden)
    with torch.no_grad():
        aux.language_offsets.normal_()
        for p in aux.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)  # a trained head, which names some language for some summaries
        offsets, logits, thoughts = aux.language_offsets.clone(), aux.language_logits(SUMMARIES), aux.encode(SUMMARIES)
    with pytest.raises(CheckpointError, match="distinct"):
        aux.add_languages(["fr"])
    aux.add_languages(["capital", "lowercase"])
    assert aux.config.languages == ["de", "fr", "capital", "lowercase"]
    with torch.no_grad():
        assert torch.equal(aux.language_offsets[:2], offsets) and not aux.language_offsets[2:].any()
        grown = aux.language_logits(SUMMARIES)
        assert torch.allclose(grown[:, :3], logits, atol=1e-5) and (grown[:, 3:] < grown[:, :3].min(-1, keepdim=True).values).all()
        assert torch.equal(aux.encode(SUMMARIES), thoughts)  # the same thoughts until the new weights are trained
        forced = aux.encode(SUMMARIES, torch.tensor([[0.0, 0.0, 1.0, 0.0]] * len(SUMMARIES)))
        aux.language_offsets[2].fill_(0.25)
        assert torch.allclose(aux.encode(SUMMARIES, torch.tensor([[0.0, 0.0, 1.0, 0.0]] * len(SUMMARIES))) - forced,
                              torch.full_like(forced, 0.25))
    assert any(p.requires_grad and p.shape[0] == 5 for p in aux.parameters())  # the head's grown rows train


def test_a_wide_language_head_replaces_the_linear_one_and_round_trips(tiny, tmp_path):
    torch.manual_seed(0)
    aux = SoftThoughtAux.for_backbone(tiny, num_thoughts=2, copy_thoughts=1).eval()
    aux.add_languages(["de", "fr"])
    with torch.no_grad():
        aux.language_offsets[1].fill_(0.5)
        before = aux.encode(SUMMARIES)
        offsets = aux.language_offsets.clone()
    aux.new_language_head(16)
    assert aux.config.language_head_hidden == 16 and not hasattr(aux, "language_table_head")
    with torch.no_grad():
        assert torch.equal(aux.language_offsets, offsets)
        assert aux.language_logits(SUMMARIES).softmax(-1)[:, 0].min() > 0.99  # a fresh head names none
        assert torch.equal(aux.encode(SUMMARIES), before)
        aux.language_head[-1].bias.copy_(torch.tensor([0.0, 0.0, 9.0]))
        forced = aux.encode(SUMMARIES, torch.tensor([[0.0, 1.0]] * len(SUMMARIES)))
        assert torch.allclose(aux.encode(SUMMARIES), forced)
        # every pooling reaches the logits: the encoder's and the table's
        for score in (aux.language_score, aux.language_table_score):
            logits = aux.language_logits(SUMMARIES)
            score.weight.normal_()
            assert not torch.allclose(logits, aux.language_logits(SUMMARIES))
    aux.save_pretrained(tmp_path)
    loaded = SoftThoughtAux.from_pretrained(tmp_path, backbone=tiny).eval()
    assert loaded.config.language_head_hidden == 16
    with torch.no_grad():
        assert torch.equal(loaded.language_logits(SUMMARIES), aux.language_logits(SUMMARIES))
        assert torch.equal(loaded.encode(SUMMARIES), aux.encode(SUMMARIES))
    with pytest.raises(CheckpointError, match="no languages"):
        SoftThoughtAux.for_backbone(tiny, num_thoughts=2).new_language_head(8)


def test_the_backbone_can_read_the_summary_for_the_language_head(tiny, tmp_path):
    torch.manual_seed(0)
    aux = SoftThoughtAux.for_backbone(tiny, num_thoughts=2, copy_thoughts=1).eval()
    aux.add_languages(["de", "fr"])
    with pytest.raises(CheckpointError, match="language_head_hidden"):
        aux.new_language_head(0, 1)
    with torch.no_grad():
        aux.language_offsets[1].fill_(0.5)
        before = aux.encode(SUMMARIES)
    with pytest.raises(CheckpointError, match="layers"):
        aux.new_language_head(16, tiny.model.config.num_hidden_layers + 1)
    aux.new_language_head(16, 1)
    # the backbone reads, but it is no part of the auxiliary model: never trained, moved or saved with it
    backbone = {id(p) for p in tiny.model.parameters()}
    assert not any(id(p) in backbone for p in aux.parameters())
    assert not any(k.startswith("_reader") for k in aux.state_dict())
    fingerprint = tiny.fingerprint
    states, valid = aux.reader_states(SUMMARIES)
    assert states.shape[-1] == tiny.hidden_size and valid.sum(-1).min() > 1
    # its states of a summary's tokens do not depend on the padding beside a longer one (right padding, causal)
    alone, alone_valid = aux.reader_states(SUMMARIES[:1])
    assert torch.allclose(states[0, valid[0]], alone[0, alone_valid[0]], atol=1e-5)
    with torch.no_grad():
        assert aux.language_logits(SUMMARIES).softmax(-1)[:, 0].min() > 0.99  # a fresh head names none
        assert torch.equal(aux.encode(SUMMARIES), before)
        aux.language_head[-1].bias.copy_(torch.tensor([0.0, 0.0, 9.0]))  # it names French: encode adds the offset
        forced = aux.encode(SUMMARIES, torch.tensor([[0.0, 1.0]] * len(SUMMARIES)))
        assert torch.allclose(aux.encode(SUMMARIES), forced) and not torch.allclose(forced, before)
        logits = aux.language_logits(SUMMARIES)
        aux.language_score.weight.normal_()  # the poolings count
        assert not torch.allclose(logits, aux.language_logits(SUMMARIES))
    with pytest.raises(ValueError, match="pass languages"):
        batch = aux.tokenize(SUMMARIES)
        aux(batch["input_ids"], batch["attention_mask"], batch["copy_ids"], batch["copy_align"])
    aux.save_pretrained(tmp_path)
    loaded = SoftThoughtAux.from_pretrained(tmp_path, backbone=tiny).eval()
    assert loaded.config.language_reader_layers == 1
    with torch.no_grad():
        assert torch.equal(loaded.language_logits(SUMMARIES), aux.language_logits(SUMMARIES))
    assert tiny.fingerprint == fingerprint
