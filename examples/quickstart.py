"""Gaussian-process regression with the DEQ kernel on scikit-learn's diabetes data.

Runs in a few seconds on a laptop: computes the kernel of an infinitely wide deep
equilibrium model (relu), checks its equilibrium equation, and uses it for exact GP
regression with a fixed noise level, against an RBF kernel on the same split.
"""

from __future__ import annotations

import math

import torch
from sklearn.datasets import load_diabetes
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

import deq_kernel


def gp_predict(k_train: torch.Tensor, k_cross: torch.Tensor, y: torch.Tensor, noise: float) -> torch.Tensor:
    chol = torch.linalg.cholesky(k_train + noise * torch.eye(len(y), dtype=y.dtype))
    return k_cross @ torch.cholesky_solve(y[:, None], chol).squeeze(-1)


def main() -> None:
    x, y = load_diabetes(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0)
    scaler = StandardScaler().fit(x_train)
    x_train, x_test = (torch.as_tensor(scaler.transform(a)) for a in (x_train, x_test))
    mean, std = y_train.mean(), y_train.std()
    y_train_t = torch.as_tensor((y_train - mean) / std)

    hyper = dict(activation="relu", weight_variance=1.5, bias_variance=0.1, input_variance=1.0)
    k_train = deq_kernel.equilibrium_covariance(x_train, **hyper)
    k_cross = deq_kernel.equilibrium_covariance(x_test, x_train, **hyper)
    print(f"DEQ kernel (relu, weight_variance=1.5): {tuple(k_train.shape)} train matrix")

    # The equilibrium: K* = w E[relu(u) relu(v)] + s, with k = E[relu(u) relu(v)] (output_variance 1).
    k_star = deq_kernel.equilibrium_covariance(x_train, output="preactivation", **hyper)
    s = x_train @ x_train.T / x_train.shape[1] + 0.1
    residual = (k_star - (1.5 * k_train + s)).abs().max() / k_star.abs().max()
    print(f"equilibrium residual |K* - (w k + s)| / |K*| = {residual:.1e}")
    print(f"smallest eigenvalue of the train matrix: {torch.linalg.eigvalsh(k_train).min():.3e} (> 0)")

    scale = 1.0 / k_train.diagonal().mean()
    pred = gp_predict(scale * k_train, scale * k_cross, y_train_t, noise=0.5) * std + mean
    rbf_train = torch.exp(-0.5 * torch.cdist(x_train, x_train) ** 2 / 10.0)
    rbf_cross = torch.exp(-0.5 * torch.cdist(x_test, x_train) ** 2 / 10.0)
    pred_rbf = gp_predict(rbf_train, rbf_cross, y_train_t, noise=0.5) * std + mean
    for name, p in (("DEQ (relu)", pred), ("RBF", pred_rbf)):
        rmse = math.sqrt(float(((p.numpy() - y_test) ** 2).mean()))
        r2 = 1 - ((p.numpy() - y_test) ** 2).sum() / ((y_test - y_test.mean()) ** 2).sum()
        print(f"{name:<11} held-out RMSE {rmse:6.2f}   R^2 {r2:.3f}")


if __name__ == "__main__":
    main()
