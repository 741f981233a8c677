"""Data: dataset readers behind one spec string, image/video loading, face preprocessing, transforms.

- :func:`masm.data.spec.open_dataset` (``dfb:PATH.json[@split]``, ``folder:DIR``, ``frames:PATH.jsonl``,
  ``genimage:ROOT[@split]``, ``univfd:ROOT``, ``chameleon:ROOT``) -> :class:`masm.data.index.FrameIndex`
- :class:`masm.data.reencode.Reencoder`: every image re-encoded alike (format alignment, bias check)
- :class:`masm.data.dataset.FrameDataset`, :func:`masm.data.dataset.collate_frames`
- :func:`masm.data.transforms.build_transform`, :class:`masm.data.transforms.AugmentConfig`
- :func:`masm.data.perturb.apply_perturbation`, :func:`masm.data.perturb.parse_perturbation`
- :func:`masm.data.images.load_rgb`, :func:`masm.data.video.read_frames`,
  :class:`masm.data.faces.FaceAligner`, :func:`masm.data.preprocess.run_preprocess`

Import from the submodules; this package imports nothing heavy (torch, dlib, av) by itself.
"""
