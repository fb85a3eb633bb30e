r"""SensiMix: 8-bit index sensitive parts, 1-bit FFNs in the insensitive layers, ABWR, PT, ILF.

  python -m mpqbert.main --config=configs/sensimix.py --config.task=sst2 \
      --config.data.glue_dir=../shared/data/glue --workdir=/tmp/mpqbert/sensimix_sst2

Ablations: --config.sensimix.abwr_weight=0, --config.sensimix.prioritized_training=False,
--config.sensimix.inverse_layerwise=False; the sensitivity-chosen split:
--config.sensimix.split=auto; variants: --config.quant.binary_scale=True (XNOR-Net scale),
--config.quant.ffn_input_bits=8, --config.quant.binary_input_clip=1 (hard-tanh STE on the
binarized inputs). All keys and defaults: `mpqbert/defaults.py`.

Faithful to the authors' code (snudm-starlab/SensiMix) where it makes a design choice, ours
where theirs has a bug; every difference is a switch:
- Design choices, theirs by default: start from the pretrained checkpoint, not a fine-tuned
  teacher (`sensimix.init=pretrained`; `teacher` starts from the teacher's weights; their
  BERT-base cut to 6 layers is `--config.model=bert-base-uncased --config.model_layers=6`);
  6 epochs at lr 2.5e-5, batch 16, no distillation (`config.train`); the FFN inputs of the
  future 1-bit layers already binarized during prioritized training and the ILF stages before
  their turn (`sensimix.binarize_inputs_early=True`); ABWR on classification tasks only
  (`sensimix.abwr_on_regression=False`); unscaled 1-bit weights sign(w)
  (`quant.binary_scale=False`). That last choice breaks regression: on STS-B, binarizing a
  layer's FFN makes its output ~13x larger, the LayerNorm after it drowns the attention residual,
  and the regression output shifts far off the labels, so the stage's MSE training loses the
  correlation (`experiments/results/sensimix_stage_jump_stsb.md`). With
  `quant.binary_scale=True` the study's STS-B seed 0 scores Pearson 84.36 instead of 34.16.
- Bugs, ours by default: their binarized FFN input also replaces the FFN block's residual, an
  in-place `input.data` overwrite that the paper's architecture does not have
  (`sensimix.binary_input_residual=False`); in their final stage no task gradient reaches the
  1-bit weights (the `.data` writes detach them; only ABWR moves them), although the paper trains
  them with the straight-through estimator (`sensimix.freeze_binary_signs=False`); their weight
  gradient clip is one-sided, zero only where w > 1, because the line meant for w < -1 repeats
  the w > 1 one (`sensimix.one_sided_weight_clip=False`: ours passes it where |w| <= 1).
"""

from mpqbert import defaults


def get_config():
  return defaults.sensimix_config()
