"""Training Medical SAM 2: loss (:mod:`.losses`), step (:mod:`.step`), optimiser (:mod:`.optim`), mesh and
sharding rules (:mod:`.sharding`), checkpoints (:mod:`.checkpoint`), the loop (:mod:`.loop`) and the command
line (:mod:`.cli`, behind ``train.py``)."""
