"""Post-training: SFT on chats and DPO on token-id pairs."""
