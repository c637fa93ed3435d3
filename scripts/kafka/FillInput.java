// Fills partition 0 of a topic with `count` empty records as fast as the broker takes them, then
// commits `group`'s position at the end, as if an anonymizer had read everything. For
// scripts/bench-verify.sh: `verify` reads only the offsets of the input topic, not the values.
//
// java -cp "$KAFKA_HOME/libs/*" FillInput.java BROKERS TOPIC GROUP COUNT
import java.util.List;
import java.util.Map;
import java.util.Properties;
import org.apache.kafka.clients.consumer.KafkaConsumer;
import org.apache.kafka.clients.consumer.OffsetAndMetadata;
import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.common.TopicPartition;
import org.apache.kafka.common.serialization.ByteArrayDeserializer;
import org.apache.kafka.common.serialization.ByteArraySerializer;

public class FillInput {
  public static void main(String[] args) throws Exception {
    String brokers = args[0], topic = args[1], group = args[2];
    long count = Long.parseLong(args[3]);
    Properties p = new Properties();
    p.put("bootstrap.servers", brokers);
    p.put("linger.ms", "50");
    p.put("batch.size", "1048576");
    p.put("compression.type", "lz4");
    p.put("acks", "1");
    p.put("buffer.memory", "268435456");
    byte[] empty = new byte[0];
    try (KafkaProducer<byte[], byte[]> producer =
        new KafkaProducer<>(p, new ByteArraySerializer(), new ByteArraySerializer())) {
      for (long i = 0; i < count; i++) {
        producer.send(new ProducerRecord<>(topic, 0, null, empty));
      }
      producer.flush();
    }
    Properties c = new Properties();
    c.put("bootstrap.servers", brokers);
    c.put("group.id", group);
    c.put("enable.auto.commit", "false");
    TopicPartition tp = new TopicPartition(topic, 0);
    try (KafkaConsumer<byte[], byte[]> consumer =
        new KafkaConsumer<>(c, new ByteArrayDeserializer(), new ByteArrayDeserializer())) {
      long end = consumer.endOffsets(List.of(tp)).get(tp);
      consumer.commitSync(Map.of(tp, new OffsetAndMetadata(end)));
      System.out.println("filled " + topic + ": end offset " + end + ", " + group + " committed there");
    }
  }
}
