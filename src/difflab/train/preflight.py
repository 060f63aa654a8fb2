"""Checks of a whole recipe, run before the run folder is created (`Config.from_dict` has
already checked each section on its own): the network [model] asks for, planned on the meta
device so that a huge one is refused at once, and the [sample] settings against that network
and [diffusion] (sampler, steps and spacing against T, eta only with DDIM, guidance only for a
conditional network), so that no run trains to the end and then exports a model that its own
default settings cannot sample."""

from __future__ import annotations

from torch import nn

from difflab.train.config import Config

SAMPLING_TASKS = ("diffusion", "text_diffusion", "super_resolution")  # their grids and exports use [sample]


def check_recipe(config: Config) -> None:
    """Raise ValueError, naming the key, for a recipe whose sections do not fit together."""
    network = planned_network(config)
    if config.task in SAMPLING_TASKS:
        check_sampling(config, network)


def planned_network(config: Config) -> nn.Module | None:
    """The [model] network on the meta device (no memory, no initialisation), from the keys its
    config takes (a task may read others from [model], such as the autoencoder's loss; the task
    checks those when it is built); None when the task copies a teacher's network instead."""
    from difflab.nets.base import network_class_by_name, plan_network

    if not config.model:
        return None
    try:
        known = network_class_by_name(config.model.get("class")).config_class.field_names()
        return plan_network({k: v for k, v in config.model.items() if k == "class" or k in known})
    except ValueError as error:
        raise ValueError(f"[model]: {error}") from None


def check_sampling(config: Config, network: nn.Module | None) -> None:
    """[sample] against the diffusion and the network the run trains."""
    from difflab.samplers import sampling_plan
    from difflab.train.tasks.diffusion import recipe_schedule

    s, d = config.sample, config.diffusion
    schedule = recipe_schedule(d)
    try:
        sampling_plan(schedule, s.sampler, s.steps, s.eta, s.spacing or None)
    except ValueError as error:
        raise ValueError(
            f"[sample] sampler = {s.sampler!r}, steps = {s.steps}, spacing = {s.spacing!r} does not fit the "
            f"diffusion (T = {d.T}): {error}"
        ) from None
    if s.guidance != 0 and not is_conditional(config, network):
        raise ValueError(
            f"sample.guidance = {s.guidance} is not allowed: the [model] is unconditional (no num_classes, not "
            "text-conditional), so there is nothing to guide; expected 0"
        )


def is_conditional(config: Config, network: nn.Module | None) -> bool:
    """Whether the run trains a class- or text-conditional network."""
    if config.task == "text_diffusion" or config.model.get("class") == "TextConditionalUNet":
        return True
    return getattr(getattr(network, "config", None), "num_classes", None) is not None
