"""``masm bench aigi``: cross-generator generalisation on whole generated images, made offline.

Whole AI-generated images (GenImage, UniversalFakeDetect, Chameleon) cannot be downloaded where masm runs,
so the benchmark makes its own generators: small convolutional autoencoders, trained here on the demo's
real photos, that differ only in how their decoders upsample (transposed convolution, nearest, bilinear,
pixel shuffle; one with a x8 latent). Their reconstructions of real crops they never saw are the fakes.
Every method trains on ONE generator's fakes (default: the transposed convolution), selects its checkpoint
on that generator only, and is tested on every generator: per generator the frame accuracy at 0.5, AP and
AUC, and their mean over the generators unseen in training, as mean ± std over seeds.

The package, by job: :mod:`.generators` (the autoencoders, their training and cache), :mod:`.data` (the
three folder datasets), :mod:`.runs` (one method and seed: train, test), :mod:`.report` (summary and
tables) and :mod:`.command` (the options and a run from them).
"""

from __future__ import annotations

from .command import add_arguments, run

__all__ = ["add_arguments", "run"]
