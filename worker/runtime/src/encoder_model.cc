// wbroker runtime: the BERT encoder, mirroring transformers' BertModel (sdpa path).
#include "wbroker/runtime/encoder_model.h"

#include <ATen/ops/arange.h>
#include <ATen/ops/embedding.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/layer_norm.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/scaled_dot_product_attention.h>
#include <ATen/ops/zeros_like.h>
#include <c10/core/InferenceMode.h>

#include <cmath>

namespace wbroker::runtime {

/// The weights of one BertLayer.
struct EncoderModel::Layer {
  at::Tensor q_w, q_b, k_w, k_b, v_w, v_b;      ///< attention.self.{query,key,value}
  at::Tensor ao_w, ao_b, ao_norm_w, ao_norm_b;  ///< attention.output.{dense,LayerNorm}
  at::Tensor i_w, i_b;                          ///< intermediate.dense
  at::Tensor o_w, o_b, o_norm_w, o_norm_b;      ///< output.{dense,LayerNorm}
};

namespace {

class Binder {
 public:
  Binder(const WeightMap& w, std::string prefix) : w_(w), prefix_(std::move(prefix)) {}

  /// `name`; for LayerNorm weights also the TF-era spelling (gamma/beta).
  at::Tensor Get(const std::string& name, std::vector<int64_t> shape) {
    if (!status_.ok()) return {};
    auto it = w_.find(prefix_ + name);
    if (it == w_.end() && name.find("LayerNorm.") != std::string::npos) {
      std::string alt = name;
      if (alt.ends_with(".weight")) alt.replace(alt.size() - 6, 6, "gamma");
      if (alt.ends_with(".bias")) alt.replace(alt.size() - 4, 4, "beta");
      it = w_.find(prefix_ + alt);
    }
    if (it == w_.end()) {
      status_ = Status(ErrorCode::kInvalidArgument, "weight '" + prefix_ + name + "' is missing");
      return {};
    }
    const at::Tensor& t = it->second;
    if (t.sizes() != c10::IntArrayRef(shape)) {
      status_ = Status(ErrorCode::kInvalidArgument,
                       "weight '" + it->first + "' has shape " + c10::str(t.sizes()) +
                           ", the config implies " + c10::str(c10::IntArrayRef(shape)));
      return {};
    }
    if (!first_.defined()) {
      first_ = t;
      if (!c10::isFloatingType(t.scalar_type()))
        status_ =
            Status(ErrorCode::kInvalidArgument, "weight '" + it->first + "' is not floating point");
    } else if (t.scalar_type() != first_.scalar_type() || t.device() != first_.device()) {
      status_ = Status(ErrorCode::kInvalidArgument,
                       "weight '" + it->first + "' differs in dtype/device from the others");
    }
    return t;
  }
  const Status& status() const { return status_; }
  c10::Device device() const { return first_.defined() ? first_.device() : c10::Device(c10::kCPU); }

 private:
  const WeightMap& w_;  ///< all weights
  std::string prefix_;  ///< "bert." or ""
  Status status_;       ///< first problem
  at::Tensor first_;    ///< the first weight bound (dtype/device reference)
};

}  // namespace

EncoderModel::~EncoderModel() = default;

Result<std::unique_ptr<EncoderModel>> EncoderModel::Create(ModelConfig config, WeightMap weights,
                                                           PoolingConfig pooling) {
  if (config.family != ModelFamily::kBert)
    return Status(ErrorCode::kInvalidArgument,
                  "EncoderModel: model_type '" + config.model_type + "' is not bert");
  try {
    std::unique_ptr<EncoderModel> m(new EncoderModel());
    const ModelConfig& c = config;
    const std::string prefix =
        weights.count("bert.embeddings.word_embeddings.weight") ? "bert." : "";
    Binder b(weights, prefix);
    const int64_t h = c.hidden_size, inter = c.intermediate_size;
    m->word_ = b.Get("embeddings.word_embeddings.weight", {c.vocab_size, h});
    m->position_ = b.Get("embeddings.position_embeddings.weight", {c.max_position_embeddings, h});
    m->token_type_ = b.Get("embeddings.token_type_embeddings.weight", {c.type_vocab_size, h});
    m->emb_norm_w_ = b.Get("embeddings.LayerNorm.weight", {h});
    m->emb_norm_b_ = b.Get("embeddings.LayerNorm.bias", {h});
    for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
      const std::string p = "encoder.layer." + std::to_string(i) + ".";
      Layer l;
      l.q_w = b.Get(p + "attention.self.query.weight", {h, h});
      l.q_b = b.Get(p + "attention.self.query.bias", {h});
      l.k_w = b.Get(p + "attention.self.key.weight", {h, h});
      l.k_b = b.Get(p + "attention.self.key.bias", {h});
      l.v_w = b.Get(p + "attention.self.value.weight", {h, h});
      l.v_b = b.Get(p + "attention.self.value.bias", {h});
      l.ao_w = b.Get(p + "attention.output.dense.weight", {h, h});
      l.ao_b = b.Get(p + "attention.output.dense.bias", {h});
      l.ao_norm_w = b.Get(p + "attention.output.LayerNorm.weight", {h});
      l.ao_norm_b = b.Get(p + "attention.output.LayerNorm.bias", {h});
      l.i_w = b.Get(p + "intermediate.dense.weight", {inter, h});
      l.i_b = b.Get(p + "intermediate.dense.bias", {inter});
      l.o_w = b.Get(p + "output.dense.weight", {h, inter});
      l.o_b = b.Get(p + "output.dense.bias", {h});
      l.o_norm_w = b.Get(p + "output.LayerNorm.weight", {h});
      l.o_norm_b = b.Get(p + "output.LayerNorm.bias", {h});
      m->layers_.push_back(std::move(l));
    }
    WB_RETURN_IF_ERROR(b.status());
    m->device_ = b.device();
    m->config_ = std::move(config);
    m->pooling_ = std::move(pooling);
    m->weights_ = std::move(weights);
    return m;
  } catch (const std::exception& e) {
    return Status(ErrorCode::kInternal, std::string("EncoderModel: ") + e.what());
  }
}

Result<std::unique_ptr<EncoderModel>> EncoderModel::Load(const std::filesystem::path& snapshot_dir,
                                                         WeightMap weights) {
  WB_ASSIGN_OR_RETURN(ModelConfig config, ModelConfig::FromFile(snapshot_dir));
  WB_ASSIGN_OR_RETURN(PoolingConfig pooling, LoadPoolingConfig(snapshot_dir));
  return Create(std::move(config), std::move(weights), std::move(pooling));
}

at::Tensor EncoderModel::Encode(const at::Tensor& ids, const at::Tensor& mask, bool padded) const {
  const ModelConfig& c = config_;
  const int64_t batch = ids.size(0), len = ids.size(1), h = c.hidden_size, hd = c.head_dim;
  const double eps = c.layer_norm_eps;
  // BertEmbeddings: word + token_type, + position, LayerNorm.
  at::Tensor emb = at::embedding(word_, ids).add(at::embedding(token_type_, at::zeros_like(ids)));
  at::Tensor positions = at::arange(len, ids.options()).unsqueeze(0);
  emb = emb.add(at::embedding(position_, positions));
  at::Tensor hidden = at::layer_norm(emb, {h}, emb_norm_w_, emb_norm_b_, eps);
  // The bidirectional padding mask (True = attend), as transformers' sdpa_mask builds it.
  std::optional<at::Tensor> attn_mask;
  if (padded) attn_mask = mask.to(c10::kBool).view({batch, 1, 1, len}).expand({batch, 1, len, len});
  const double scaling = std::pow(static_cast<double>(hd), -0.5);
  for (const Layer& l : layers_) {
    at::Tensor q = at::linear(hidden, l.q_w, l.q_b).view({batch, len, -1, hd}).transpose(1, 2);
    at::Tensor k = at::linear(hidden, l.k_w, l.k_b).view({batch, len, -1, hd}).transpose(1, 2);
    at::Tensor v = at::linear(hidden, l.v_w, l.v_b).view({batch, len, -1, hd}).transpose(1, 2);
    at::Tensor attn =
        at::scaled_dot_product_attention(q, k, v, attn_mask, 0.0, /*is_causal=*/false, scaling);
    attn = attn.transpose(1, 2).contiguous().reshape({batch, len, -1}).contiguous();
    at::Tensor a = at::layer_norm(at::linear(attn, l.ao_w, l.ao_b).add(hidden), {h}, l.ao_norm_w,
                                  l.ao_norm_b, eps);
    at::Tensor i = at::gelu(at::linear(a, l.i_w, l.i_b));
    hidden = at::layer_norm(at::linear(i, l.o_w, l.o_b).add(a), {h}, l.o_norm_w, l.o_norm_b, eps);
  }
  return hidden;
}

Result<std::vector<std::vector<float>>> EncoderModel::Embed(
    const std::vector<std::vector<int32_t>>& ids_batch) const {
  std::vector<std::vector<float>> out;
  if (ids_batch.empty()) return out;
  size_t max_len = 0;
  for (const auto& ids : ids_batch) {
    if (ids.empty()) return Status(ErrorCode::kInvalidArgument, "Embed: empty input");
    if (static_cast<int64_t>(ids.size()) > config_.max_position_embeddings)
      return Status(ErrorCode::kInvalidArgument,
                    "Embed: input of " + std::to_string(ids.size()) + " tokens exceeds " +
                        "max_position_embeddings " +
                        std::to_string(config_.max_position_embeddings));
    for (int32_t id : ids)
      if (id < 0 || id >= config_.vocab_size)
        return Status(ErrorCode::kInvalidArgument,
                      "Embed: token id " + std::to_string(id) + " is outside the vocabulary");
    max_len = std::max(max_len, ids.size());
  }
  try {
    c10::InferenceMode guard;
    const int64_t batch = static_cast<int64_t>(ids_batch.size()),
                  len = static_cast<int64_t>(max_len);
    std::vector<int64_t> flat_ids(batch * len, config_.pad_token_id.value_or(0)),
        flat_mask(batch * len, 0);
    bool padded = false;
    for (int64_t b = 0; b < batch; ++b) {
      const auto& ids = ids_batch[b];
      padded |= static_cast<int64_t>(ids.size()) != len;
      for (size_t t = 0; t < ids.size(); ++t) {
        flat_ids[b * len + t] = ids[t];
        flat_mask[b * len + t] = 1;
      }
    }
    auto cpu_long = at::TensorOptions().dtype(c10::kLong);
    at::Tensor ids = at::from_blob(flat_ids.data(), {batch, len}, cpu_long).to(device_);
    at::Tensor mask = at::from_blob(flat_mask.data(), {batch, len}, cpu_long).to(device_);
    at::Tensor pooled =
        Pool(Encode(ids, mask, padded), mask, pooling_).to(c10::kCPU, c10::kFloat).contiguous();
    const int64_t dim = pooled.size(1);
    const float* p = pooled.data_ptr<float>();
    for (int64_t b = 0; b < batch; ++b) out.emplace_back(p + b * dim, p + (b + 1) * dim);
    return out;
  } catch (const std::exception& e) {
    return Status(ErrorCode::kInternal, std::string("encoder forward: ") + e.what());
  }
}

}  // namespace wbroker::runtime
