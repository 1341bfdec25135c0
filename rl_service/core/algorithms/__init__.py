"""What trains: registry.py maps names to algorithms with hyperparams.py's typed schemas; reinforce.py is
REINFORCE as a stable-baselines3 algorithm, reinforce_update.py the update it shares with named policies,
ppo_update.py PPO's update (with its critic) for named policies, and networks.py the policy networks."""
