"""Named policies trained from client-collected experience (PolicyService): spec.py validates a client's spec
(REINFORCE or PPO), experience.py checks batches and splits episodes, ppo_batch.py checks PPO's extra inputs,
updates.py runs one batch's update per algorithm, live_policy.py holds a policy's state in memory, state_codec.py
is its on-disk format, transactions.py rolls a failed change back, writer.py saves states before the reply or
behind it (POLICY_SYNC), manager.py ties them together, records.py is what the service answers, ports.py the store
infra provides."""
