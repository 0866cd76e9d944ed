"""Deployment to the targets' own compilers: Arm Ethos-U through Vela (:mod:`.ethos_u`)."""
