"""Writes bsuite_deep_sea.json: Deep Sea trajectories recorded from bsuite itself (not a dubito
dependency). Run with bsuite installed: python make_bsuite_deep_sea.py > bsuite_deep_sea.json
Episodes 0, 3 follow the optimal path; the others take seeded random actions."""

import json

import numpy as np
from bsuite.environments import deep_sea

out = []
for size, mseed, aseed in [(3, 0, 0), (5, 42, 1), (6, 7, 2), (8, 42, 3)]:
    env = deep_sea.DeepSea(size, mapping_seed=mseed)
    rng = np.random.RandomState(aseed)
    for ep in range(6):
        ts = env.reset()
        actions, obs, rewards = [], [np.argwhere(ts.observation).tolist()], []
        while not ts.last():
            a = (
                int(rng.randint(2))
                if ep % 3
                else int(env._action_mapping[len(actions), min(len(actions), size - 1)])
            )
            ts = env.step(a)
            actions.append(a)
            rewards.append(float(ts.reward))
            obs.append(np.argwhere(ts.observation).tolist())
        out.append(
            dict(
                size=size,
                mapping_seed=mseed,
                actions=actions,
                cells=obs,
                rewards=rewards,
                bad_total=env.bsuite_info()["total_bad_episodes"],
            )
        )
print(json.dumps(out))
