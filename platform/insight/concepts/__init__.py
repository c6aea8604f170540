"""Concepts of a trained SAE: relations, hierarchy, names, galleries (docs/method.md, Relations and Naming).

`insight concepts --model REF` runs `mine_concepts`: one streaming pass over an
activation cache (`stats`), a cycle-free transitively reduced hierarchy
(`hierarchy`, drawn by `tree`), names from a vocabulary (`vocabulary`,
`naming`), galleries (`galleries`), and a concept table (`table`) logged with
the model's MLflow run; `load_model(...).concepts` brings the table back.
"""

from insight.concepts.table import Candidate, Concept, ConceptTable, Relation, Relations, TopPatch

__all__ = ["Candidate", "Concept", "ConceptTable", "Relation", "Relations", "TopPatch", "mine_concepts"]


def __getattr__(name: str):
    if name == "mine_concepts":  # lazy: the step pulls in Ray, MLflow and the backbones
        from insight.concepts.run import mine_concepts

        return mine_concepts
    raise AttributeError(name)
