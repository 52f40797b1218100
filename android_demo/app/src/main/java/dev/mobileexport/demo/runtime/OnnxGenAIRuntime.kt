// Never compiled: written without the Android SDK (see android_demo/README.md).
package dev.mobileexport.demo.runtime

import ai.onnxruntime.genai.Generator
import ai.onnxruntime.genai.GeneratorParams
import ai.onnxruntime.genai.Model
import dev.mobileexport.demo.bundle.BundleFiles

/** A bundle's ONNX folder in ONNX Runtime GenAI's Android package: one generator per sequence.
 * Its Java API returns tokens, not logits (its Tensor has no data accessor), so a step appends the
 * tokens, lets GenAI pick the greedy next one, and rewinds that token off again, so the caller
 * feeds whichever token comes next (the generated one, or the reference's when teacher-forcing). */
class OnnxGenAIRuntime(private val bundle: BundleFiles) : LanguageModelRuntime {
    override val name = "onnxruntime-genai"
    override val maxSeqLen: Int get() = bundle.contextLength
    private var model: Model? = null
    private var generator: Generator? = null
    private var length = 0

    override fun load() {
        model = Model(bundle.folder.absolutePath)
    }

    override fun step(tokens: IntArray, startPos: Int): Step {
        val model = checkNotNull(model) { "load() first" }
        if (startPos == 0) {
            generator?.close()
            val params = GeneratorParams(model).apply {
                setSearchOption("max_length", maxSeqLen.toDouble())
                setSearchOption("do_sample", false)
            }
            generator = Generator(model, params)
            length = 0
        }
        val generator = checkNotNull(generator)
        require(startPos == length) { "ONNX Runtime GenAI appends tokens in order: step at $startPos, sequence at $length" }
        require(startPos + tokens.size < maxSeqLen) { "sequence exceeds the model's context of $maxSeqLen" }
        generator.appendTokens(tokens)
        length += tokens.size
        generator.generateNextToken()
        val next = generator.getLastTokenInSequence(0)
        generator.rewindTo(length.toLong())
        return Step(next, null)
    }

    override fun close() {
        generator?.close()
        model?.close()
        generator = null
        model = null
    }
}
