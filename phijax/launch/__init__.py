"""`phijax launch`: one typed launch spec rendered for a cluster, never wrapped.

spec.py (LaunchSpec, the hardware a topology or node count means, the checks), render.py (the
templates under the source tree's `launch/` folder, one per target), local.py (the local
target's processes and their runner), submit.py (`--submit`: the user's own gcloud, xpk,
kubectl, sbatch or sky), command.py (the CLI command). From Python:

    from phijax.launch.spec import LaunchSpec
    from phijax.launch.render import render    # render(spec) -> list[Rendered(name, text)]
    from phijax.launch.submit import submit    # submit(spec, out=None) -> exit status
"""
