r"""SensiMix: 8-bit index sensitive parts, 1-bit FFNs in the insensitive layers, ABWR, PT, ILF.

  python -m mpqbert.main --config=configs/sensimix.py --config.task=sst2 \
      --config.data.glue_dir=../shared/data/glue --workdir=/tmp/mpqbert/sensimix_sst2

Ablations: --config.sensimix.abwr_weight=0, --config.sensimix.prioritized_training=False,
--config.sensimix.inverse_layerwise=False; the sensitivity-chosen split:
--config.sensimix.split=auto; variants: --config.quant.binary_scale=True (XNOR-Net scale),
--config.quant.ffn_input_bits=8, --config.quant.binary_input_clip=1 (hard-tanh STE on the
binarized inputs). All keys and defaults: `mpqbert/defaults.py`.
"""

from mpqbert import defaults


def get_config():
  return defaults.sensimix_config()
