"""`limoe pretrain`: OmniVec2's masked pretraining stages for the shared tower.

`objective` is the module the training engine wraps (its tasks and their schedule), `heads` the
training-only parts it adds to the model (MAE's pixel decoder, BERT's output head, the
cross-attention fusion blocks), `losses` the masked-image and masked-token losses, `evaluation`
the held-out measurements, and `command` the entry point, which runs inside `limoe train`'s loop.
The masks themselves come from `limoe.model.masking`, which FLIP's contrastive training shares.
"""
