"""Mean loss (per token, or per example) and perplexity from per-example sums.

Each example contributes the SUM of its token losses (`predictions`, nats) and the NUMBER of tokens
that carried a label (`references`). The result is the mean over all tokens of the set,
sum(predictions) / sum(references), and perplexity = exp(that mean). Summing per example (rather
than averaging per-batch means) makes the number independent of batch size, of the number of
processes and of how many tokens each example has (masked LM), so runs are comparable.
"""

import math

import datasets
import evaluate

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of float): per-example sum of token cross-entropies (natural log).
    references (list of int): per-example number of scored tokens.
Returns:
    loss (float): mean token loss; perplexity (float): exp(loss); count (int): scored tokens (or examples).
"""


class MeanLoss(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("float64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references):
        tokens = int(sum(references))
        if tokens == 0:
            raise ValueError("mean_loss: no scored tokens in the evaluation set")
        loss = math.fsum(predictions) / tokens
        return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "count": tokens}
