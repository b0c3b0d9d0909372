"""The post-training toy experiment: PTS-DPO against sequence DPO on arithmetic word problems."""
